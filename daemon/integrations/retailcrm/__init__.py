"""The RetailCRM (Simla.com) adapter."""

"""CRM adapters, one folder each, loaded by name (see ``load``)."""

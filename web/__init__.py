"""crm-bridge's HTTP side: the aiohttp application, its routes and templates."""

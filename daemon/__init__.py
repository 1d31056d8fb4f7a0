"""crm-bridge: delivers a cloud PBX platform's call events to its enterprises' CRMs."""

__version__ = "0.1.0"

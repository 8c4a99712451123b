"""The coordinator's domain operations: each write is one store transaction plus its audit events."""

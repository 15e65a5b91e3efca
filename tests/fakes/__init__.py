"""Small in-memory stand-ins for the application's interfaces, shared by unit
and component tests (the real implementations live in agent/)."""

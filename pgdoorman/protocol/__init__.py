"""
The PostgreSQL frontend/backend protocol, version 3.0: message codes, encoders and the few
decoders the pooler needs.  Shared by the client-facing and the server-facing sides.

See https://www.postgresql.org/docs/15/protocol-message-formats.html
"""

"""The engine as a ZeroMQ service: the server, the clients, their protocol and addressing."""

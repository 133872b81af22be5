"""exitwise interfaces: the REST API (FastAPI) and the command line."""

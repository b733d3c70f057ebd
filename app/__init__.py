"""The StarMap FastAPI server."""

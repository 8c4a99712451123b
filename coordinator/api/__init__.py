"""HTTP layer of the coordinator: FastAPI app, authentication dependencies and the /api/v1 routes."""

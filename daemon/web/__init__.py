"""The pages staff reach from their messages, the board, and the health endpoints."""

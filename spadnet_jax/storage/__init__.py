"""Storage: what checkpoints and other files hold, and how they are checked."""

"""The Ray Serve application (serving issue)."""

"""The encode job's stages and pipeline (Ray Data); jobs/encode.py is its entrypoint."""

"""Session settings for every test: no test writes into the user's home."""

import os

# JAX's persistent compilation cache off for the test process and every `stem-live` it starts
# (tests/test_startup.py points it at a temporary folder of its own)
os.environ["STEM_LIVE_JAX_CACHE"] = "off"

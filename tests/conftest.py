"""Tests never reach the Hugging Face hub: set before any test module imports huggingface_hub."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

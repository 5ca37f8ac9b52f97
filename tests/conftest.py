import os
import sys

from hypothesis import settings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # test helpers (reference, unets, tiny_pipes)
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: the WebUI extension's packages

settings.register_profile("default", deadline=None, max_examples=40)
settings.register_profile("thorough", deadline=None, max_examples=400)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

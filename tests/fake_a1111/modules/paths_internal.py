"""modules.paths_internal: where the WebUI keeps user data (``--data-dir``; by default the WebUI's
own folder). ``fake_a1111.install`` points it at the test's folder."""

import os

modules_path = os.path.dirname(os.path.realpath(__file__))
script_path = os.path.dirname(modules_path)
data_path = script_path
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")

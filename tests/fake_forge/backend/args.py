"""backend.args: only the dynamic arguments the LoRA loader reads."""

dynamic_args = {"online_lora": False}

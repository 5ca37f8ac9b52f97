"""modules.ui_components: InputAccordion is a (hidden) checkbox whose value is the accordion's state."""

import gradio as gr


class InputAccordion(gr.Checkbox):
    def __init__(self, value, **kwargs):
        super().__init__(value=value, label=kwargs.get("label"), elem_id=kwargs.get("elem_id"))

    def extra(self):
        return gr.Column()


class FormRow(gr.Row):
    pass


class ToolButton(gr.Button):
    pass

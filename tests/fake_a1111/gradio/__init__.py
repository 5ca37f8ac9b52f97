"""Just enough of gradio for a script's ui() to build its components outside a browser. The
version is A1111 1.10.1's (the fake Forge f2 sets its own, 4.40.0); where the versions differ in
what a component accepts, the fake refuses what that version refuses."""

__version__ = "3.41.2"


class Component:
    def __init__(self, value=None, *, label=None, elem_id=None, choices=None, **kwargs):
        self.value, self.label, self.elem_id, self.choices = value, label, elem_id, choices
        self.kwargs = kwargs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _event(self, *args, **kwargs):
        return self

    change = click = input = release = select = then = _event


class Checkbox(Component):
    pass


class Slider(Component):
    def __init__(self, minimum=0, maximum=100, value=None, **kwargs):  # gradio's positional order
        super().__init__(value, **kwargs)
        self.minimum, self.maximum = minimum, maximum


class Number(Component):
    pass


class Dropdown(Component):
    def __init__(self, choices=None, value=None, **kwargs):
        if kwargs.get("multiselect") and kwargs.get("allow_custom_value") and __version__.startswith("3."):
            raise ValueError("Custom values are not supported when `multiselect` is True.")  # gradio 3.41.2
        super().__init__(value, choices=choices, **kwargs)


class Radio(Dropdown):
    pass


class Textbox(Component):
    pass


class Button(Component):
    pass


class Markdown(Component):
    pass


class HTML(Component):
    pass


class Dataframe(Component):
    pass


class Accordion(Component):
    pass


class Row(Component):
    pass


class Column(Component):
    pass


class Group(Component):
    pass


class Blocks(Component):
    pass


class Tab(Component):
    pass


def update(**kwargs):
    return {"__type__": "update", **kwargs}

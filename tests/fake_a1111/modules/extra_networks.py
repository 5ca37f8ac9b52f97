"""modules.extra_networks: <name:args> tags, the registry, activation (then after_extra_networks_activate)."""

import re
from collections import defaultdict

extra_network_registry = {}
re_extra_net = re.compile(r"<(\w+):([^>]+)>")


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional, self.named = [], {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts):
    extra_data, cleaned = None, []
    for prompt in prompts:
        prompt, data = parse_prompt(prompt)
        extra_data = extra_data if extra_data is not None else data
        cleaned.append(prompt)
    return cleaned, extra_data


def activate(p, extra_network_data):
    from modules import errors

    for name, network in extra_network_registry.items():
        try:
            network.activate(p, extra_network_data.get(name, []))
        except Exception as e:
            errors.display(e, f"activating extra network {name}")
    if p.scripts is not None:
        p.scripts.after_extra_networks_activate(
            p,
            batch_number=p.iteration,
            prompts=p.prompts,
            seeds=p.seeds,
            subseeds=p.seeds,
            extra_network_data=extra_network_data,
        )


def deactivate(p, extra_network_data):
    for network in extra_network_registry.values():
        network.deactivate(p)

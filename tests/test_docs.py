"""The docs stay honest: hooks, config fields, CLI JSON keys, variants and plugin options are all
documented, and the plugin code in docs/plugins.md runs."""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import zoo
import zoo.cli
from zoo import hookspecs
from zoo.config import ModelConfig
from zoo.registry import REGISTRY

pytestmark = pytest.mark.usefixtures("registry_unchanged")

DOCS = Path(__file__).resolve().parents[1] / "docs"
BUILTIN_PLUGINS = ("zoo.norm_layers", "zoo.norm_strategies", "zoo.attention", "zoo.routers", "zoo.variants")


def _read(name: str) -> str:
    path = DOCS / name
    assert path.is_file(), f"{path} is missing"
    return path.read_text()


def _backticked(text: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", text))


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


# ---------------------------------------------------------------------------------------------
# Reference coverage
# ---------------------------------------------------------------------------------------------
def _specs() -> dict[str, Any]:
    return {name: fn for name, fn in vars(hookspecs).items() if callable(fn) and getattr(fn, "zoo_spec", None) is not None}


def test_every_hook_has_a_reference_heading():
    """One ``### hook(args)`` heading per hookspec, with the spec's own argument names."""
    specs = _specs()
    assert specs, "no hookspecs found"
    headings = dict(re.findall(r"^### (\w+)\(([\w, ]*)\)\s*$", _read("plugins.md"), flags=re.M))
    assert sorted(headings) == sorted(specs), "docs/plugins.md's hook headings differ from zoo/hookspecs.py"
    for name, fn in specs.items():
        assert headings[name].replace(" ", "").split(",") == list(inspect.signature(fn).parameters), name


BASES = {"register_norm_strategies": zoo.NormStrategy, "register_attention": zoo.Attention,
         "register_routers": zoo.moe.Router}


def _contract(doc: str, label: str) -> str:
    """The text of one ``Label: ...`` paragraph of a hookspec docstring."""
    m = re.search(rf"^{label}: (.*?)(?=^\w+: |\Z)", inspect.cleandoc(doc), flags=re.M | re.S)
    assert m, f"no {label} in {doc[:60]!r}"
    return " ".join(m.group(1).split())


def _hook_section(name: str) -> str:
    text = _read("plugins.md")
    start = text.index(f"### {name}(")
    end = text.find("\n### ", start + 1)
    return text[start:end if end > 0 else None]


@pytest.mark.parametrize("hook", sorted(BASES))
def test_hookspec_docstrings_are_the_reference(hook):
    """Each class hook's docstring names its constructor, attributes and methods; they are the base class's,
    and docs/plugins.md's reference section for the hook has each of them."""
    doc, base, section = _specs()[hook].__doc__, BASES[hook], " ".join(_hook_section(hook).split())
    constructor = re.match(r"``cls\(([^)]*)\)``", _contract(doc, "Constructor")).group(1)
    args = [a.strip() for a in constructor.split(",") if a.strip() != "*"]
    assert args == list(inspect.signature(base.__init__).parameters)[1:], (hook, args)
    assert f"cls({constructor})" in section.replace("`", ""), (hook, constructor)
    for attribute in re.findall(r"``(\w+)``(?: / ``(\w+)``)?", _contract(doc, "Attributes")):
        for a in filter(None, attribute):
            assert hasattr(base, a) or a in inspect.getsource(base.__init__), (hook, a)
            assert re.search(rf"`[^`]*\b{a}\b[^`]*`", section), f"docs/plugins.md's {hook} section does not mention `{a}`"
    for method, params in re.findall(r"``(\w+)\(([^)]*)\)``", _contract(doc, "Methods")):
        wanted = [p.strip() for p in params.split(",") if p.strip()]
        assert list(inspect.signature(getattr(base, method)).parameters)[1:] == wanted, (hook, method)
        assert re.search(rf"`[^`]*\b{method}\(", section), f"docs/plugins.md's {hook} section does not mention `{method}(...)`"


def _dotted_fields(cls: type, prefix: str = "") -> Iterator[str]:
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        yield name
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
            if dataclasses.is_dataclass(value):
                yield from _dotted_fields(type(value), name + ".")


def test_every_config_field_is_documented():
    fields = list(_dotted_fields(ModelConfig))
    assert "moe.router_options" in fields and "init.std" in fields
    documented = _backticked(_read("config.md"))
    missing = [f for f in fields if f not in documented]
    assert not missing, f"docs/config.md lacks these config keys (in backticks): {missing}"


def _builtin(kind: str) -> dict[str, Any]:
    out = {}
    for record in REGISTRY.plugins():
        if record.name in BUILTIN_PLUGINS and record.status == "ok":
            for name in record.registered.get(kind, []):
                out[name] = REGISTRY.get(kind, name)
    return out


def test_every_builtin_variant_is_listed_in_config_md():
    variants = _builtin("variant")
    assert "tiny-dense-hybridnorm" in variants
    documented = _backticked(_read("config.md"))
    missing = sorted(v for v in variants if v not in documented)
    assert not missing, f"docs/config.md's variant table lacks {missing}"


def test_every_builtin_plugin_option_is_documented():
    documented = _backticked(_read("config.md"))
    options: dict[str, list[str]] = {}
    for kind in ("norm strategy", "attention", "router"):
        for name, cls in _builtin(kind).items():
            if cls.Options is not None:
                options[f"{kind} {name}"] = [f.name for f in dataclasses.fields(cls.Options)]
    for name, make in _builtin("norm layer").items():
        params = inspect.signature(make).parameters
        options[f"norm layer {name}"] = [p for p in params if p not in ("dim", "eps")]
    assert options["router switch"] == ["capacity_factor"]
    missing = {who: [o for o in opts if o not in documented] for who, opts in options.items()}
    missing = {who: opts for who, opts in missing.items() if opts}
    assert not missing, f"docs/config.md lacks these plugin options (in backticks): {missing}"


@pytest.fixture(scope="module")
def cli_json() -> dict[str, Any]:
    """The JSON that `zoo list/info/plugins --json` print, from zoo.cli.main in this process."""
    import contextlib
    import io

    out = {}
    for key, argv in {"list": ["list", "tiny-dense-prenorm", "--json"],
                      "info": ["info", "tiny-dense-prenorm", "--seq-len", "8", "--json"],
                      "plugins": ["plugins", "--json"]}.items():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert zoo.cli.main(argv) == 0, argv
        out[key] = json.loads(buf.getvalue())
    return out


def test_cli_json_keys_are_documented(cli_json):
    keys = {
        "list": set().union(*(row.keys() for row in cli_json["list"])),
        "info": set(cli_json["info"]),
        "plugins": set().union(*(rec.keys() for rec in cli_json["plugins"])),
    }
    assert {"name", "total_params", "active_params"} <= keys["list"]
    assert {"config", "flops_per_token", "train_flops_per_token"} <= keys["info"]
    assert {"source", "status", "registered"} <= keys["plugins"]
    documented = _backticked(_read("cli.md"))
    missing = {cmd: sorted(k for k in ks if k not in documented) for cmd, ks in keys.items()}
    missing = {cmd: ks for cmd, ks in missing.items() if ks}
    assert not missing, f"docs/cli.md lacks these JSON keys (in backticks): {missing}"


def test_cli_json_capture_via_capsys(capsys):
    """The same keys through pytest's capsys, as a user's test of the CLI would read them."""
    assert zoo.cli.main(["list", "tiny-dense-prenorm", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    documented = _backticked(_read("cli.md"))
    assert rows and all(key in documented for row in rows for key in row)


# ---------------------------------------------------------------------------------------------
# The plugin code in docs/plugins.md runs
# ---------------------------------------------------------------------------------------------
def _exec_module(source: str, name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    try:
        exec(compile(source, f"<docs/plugins.md:{name}>", "exec"), module.__dict__)
    finally:
        del sys.modules[name]
    return module


def _train_steps(model: zoo.ZooModel, steps: int) -> list[float]:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.randint(0, model.cfg.vocab_size, (2, 17))
    losses = []
    for _ in range(steps):
        out = model(batch[:, :-1], targets=batch[:, 1:])
        loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _plugin_blocks() -> list[str]:
    """Blocks that are whole plugin modules: top-level hooks, no run-time registration of their own."""
    return [b for b in _python_blocks(_read("plugins.md"))
            if re.search(r"^@zoo\.hookimpl", b, flags=re.M) and "register_plugin(" not in b]


def _tutorial_block() -> str:
    """The tutorial's module: the first plugin module that defines a zoo.NormStrategy subclass."""
    blocks = [b for b in _plugin_blocks() if re.search(r"^class \w+\(zoo\.NormStrategy\)", b, flags=re.M)]
    assert blocks, "docs/plugins.md has no plugin module defining a zoo.NormStrategy subclass"
    return blocks[0]


def test_tutorial_plugin_module_runs():
    module = _exec_module(_tutorial_block(), "docs_tutorial_plugin")
    name = zoo.register_plugin(module, name="docs-tutorial")
    try:
        record = next(r for r in REGISTRY.plugins() if r.name == name)
        strategies = record.registered.get("norm strategy", [])
        assert strategies, record
        strategy = strategies[0]
        model = zoo.build("tiny-dense-prenorm", [f"norm_strategy={strategy}", "n_layers=1"])
        assert all(type(b.strategy).__module__ == "docs_tutorial_plugin" for b in model.blocks)
        before = [p.detach().clone() for p in model.blocks[0].strategy.parameters()]
        losses = _train_steps(model, steps=2)
        assert all(torch.isfinite(torch.tensor(losses)))
        after = list(model.blocks[0].strategy.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the strategy's parameters did not train"
        # the same placement builds as MoE, and counts on meta
        assert zoo.stats("tiny-moe-prenorm", [f"norm_strategy={strategy}"], flops=False).active_params > 0
    finally:
        zoo.unregister_plugin(name)
    assert strategy not in REGISTRY.names("norm strategy")


def _smoke(kind: str, name: str) -> None:
    """The conformance kit's in-process checks on a docs example's registration."""
    from zoo.testing import FAST, Subject, run_checks
    failed = [o for o in run_checks([Subject(kind, name)], FAST) if o.status == "failed"]
    assert not failed, failed


def _reference_blocks() -> list[str]:
    """The hook reference's examples: every plugin module but the tutorial's."""
    tutorial = _tutorial_block()
    return [b for b in _plugin_blocks() if b != tutorial]


@pytest.mark.parametrize("index", range(len(_reference_blocks())))
def test_reference_plugin_examples_register_and_build(index):
    module = _exec_module(_reference_blocks()[index], f"docs_plugin_block_{index}")
    name = zoo.register_plugin(module, name=f"docs-block-{index}")
    try:
        record = next(r for r in REGISTRY.plugins() if r.name == name)
        assert record.status == "ok" and record.registered, record
        for kind, names in record.registered.items():
            for n in names:
                _smoke(kind, n)
    finally:
        zoo.unregister_plugin(name)


def test_notebook_example_registers_builds_and_unregisters():
    blocks = _python_blocks(_read("plugins.md"))
    notebook = [b for b in blocks if "zoo.register_plugin(" in b and "NormStrategy" in b]
    cleanup = [b for b in blocks if b.strip().startswith("zoo.unregister_plugin(")]
    assert notebook and cleanup, "docs/plugins.md lacks the notebook example or its unregister_plugin block"
    before = {r.name for r in REGISTRY.plugins()}
    namespace: dict[str, Any] = {"__name__": "docs_notebook"}
    try:
        exec(compile(notebook[0], "<docs/plugins.md:notebook>", "exec"), namespace)
        added = {r.name for r in REGISTRY.plugins()} - before
        assert len(added) == 1, added
        assert isinstance(namespace.get("model"), zoo.ZooModel)
        exec(compile(cleanup[0], "<docs/plugins.md:unregister>", "exec"), namespace)
        assert {r.name for r in REGISTRY.plugins()} == before
    finally:
        for name in {r.name for r in REGISTRY.plugins()} - before:
            zoo.unregister_plugin(name)


def _console_blocks(text: str) -> list[str]:
    return re.findall(r"```console\n(.*?)```", text, re.S)


def test_check_your_plugin_examples_run(capsys):
    """The "Check your plugin" section: its `zoo check` output, and its parametrize_with_checks example."""
    from zoo.cli import main
    text = _read("plugins.md")
    section = text[text.index("## Check your plugin"):text.index("## Hook reference")]
    console = _console_blocks(section)[0]
    command, expected = console.split("\n", 1)
    module = _exec_module(_tutorial_block(), "docs_tutorial_plugin_check")
    name = zoo.register_plugin(module, name="docs-tutorial-check")
    try:
        assert main(command.removeprefix("$ zoo ").split()) == 0
        assert capsys.readouterr().out == expected
        namespace: dict[str, Any] = {"__name__": "docs_check_example"}
        exec(compile(_python_blocks(section)[0], "<docs/plugins.md:check>", "exec"), namespace)
        params = namespace["test_layerscale"].pytestmark[0].args[1]
        assert [p.id.rsplit("-", 1)[-1] for p in params][:3] == ["options", "bad_options", "meta_init"]
        from zoo.testing import FAST
        for p in params:
            if p.values[0].check in FAST:
                namespace["test_layerscale"](p.values[0])
    finally:
        zoo.unregister_plugin(name)


RUN_IN_TESTS = ("zoo list", "zoo info", "zoo plugins --json", "zoo check", "zoo generate tiny-dense-hybridnorm --prompt",
                "zoo eval tiny-dense-hybridnorm --data")  # the docs/cli.md examples that need no run folder or hours


def _cli_examples() -> list[tuple[str, str]]:
    examples = []
    for block in _console_blocks(_read("cli.md")):
        lines = block.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("$ ")] + [len(lines)]
        for i, end in zip(starts, starts[1:]):
            command = lines[i][2:]
            if command.startswith(RUN_IN_TESTS) and "|" not in command:
                examples.append((command, "\n".join(lines[i + 1:end])))
    return examples


def _matches(expected: list[str], actual: list[str]) -> bool:
    """``...`` alone on a line stands for any lines; a line ending in ``...`` for any line it starts."""
    if not expected:
        return not actual
    head = expected[0]
    if head.strip() == "...":
        return any(_matches(expected[1:], actual[k:]) for k in range(len(actual) + 1))
    if not actual:
        return False
    line, head = actual[0].rstrip(), head.rstrip()
    same = line.startswith(head[:-3]) if head.endswith("...") else line == head
    return same and _matches(expected[1:], actual[1:])


@pytest.mark.parametrize("command, expected", _cli_examples(), ids=[c for c, _ in _cli_examples()])
def test_cli_md_examples_print_what_they_show(command, expected, capsys):
    import shlex

    from zoo.cli import main
    main(shlex.split(command)[1:])
    out, err = capsys.readouterr()
    actual = [line for line in (err + out).splitlines() if not line.startswith("zoo: note:")]
    assert _matches(expected.splitlines(), actual), "\n".join(actual)


def test_the_cli_md_examples_are_found():
    commands = [c for c, _ in _cli_examples()]
    assert len(commands) >= 10 and any(c.startswith("zoo check") for c in commands)

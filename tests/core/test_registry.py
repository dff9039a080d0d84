"""d2s.registry: the one registry behind every plug-in point."""

from __future__ import annotations

import json
import sys

import pytest

from d2s.config import ConfigError
from d2s.registry import PluginRegistry, Registry


class Base:
    pass


def test_register_get_names_and_mapping():
    reg: Registry[type[Base]] = Registry("widget", base=Base)

    @reg.register("b")
    class B(Base):
        pass

    reg.add("a", type("A", (Base,), {}))
    assert reg.names() == ["a", "b"] and list(reg) == ["a", "b"] and len(reg) == 2
    assert reg.get("b") is B and reg["b"] is B and "b" in reg and "z" not in reg
    assert B.name == "b"  # classes learn their registered name
    with pytest.raises(ConfigError, match=r"unknown widget 'z'; registered: \['a', 'b'\]"):
        reg.get("z")
    with pytest.raises(ValueError, match="already registered"):
        reg.add("b", type("Other", (Base,), {}))
    reg.add("b", B)  # the same object again is fine
    with pytest.raises(ConfigError, match="is not a"):
        reg.add("c", int)


def test_instances_custom_error_and_replace():
    class MyError(ValueError):
        pass

    reg: Registry[str] = Registry("colour", error=MyError, name_attr=None)
    reg.add("red", "#f00")
    reg.add("red", "#ff0000", replace=True)
    assert reg.get("red") == "#ff0000" and dict(reg.items()) == {"red": "#ff0000"}
    with pytest.raises(MyError, match="unknown colour 'blue'"):
        reg.get("blue")


def test_module_attr_names_load_unregistered_objects():
    reg: Registry = Registry("thing")
    assert reg.get("json:dumps") is json.dumps
    with pytest.raises(ConfigError, match="cannot load thing 'json:nope'"):
        reg.get("json:nope")


def test_entry_points_are_discovered_and_loaded_lazily(tmp_path, monkeypatch):
    (tmp_path / "lazy_plugin_mod.py").write_text("LOADED = True\nclass Thing:\n    pass\n")
    (tmp_path / "broken_plugin_mod.py").write_text("raise RuntimeError('boom')\n")
    dist = tmp_path / "lazy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lazy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[d2s.test_things]\nlazy = lazy_plugin_mod:Thing\nbroken = broken_plugin_mod:X\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry = Registry("test thing", "d2s.test_things")
    assert reg.names() == ["broken", "lazy"]
    assert "lazy_plugin_mod" not in sys.modules  # listing names imports nothing
    assert reg.entry_point_targets() == {"broken": "broken_plugin_mod:X", "lazy": "lazy_plugin_mod:Thing"}
    assert reg.get("lazy").__name__ == "Thing" and reg.get("lazy").name == "lazy"
    with pytest.raises(ConfigError, match="cannot load test thing 'broken' .*boom"):
        reg.get("broken")
    assert [n for n, _ in reg.items()] == ["lazy"]  # a broken plug-in does not hide the others


def test_json_folders_package_user_and_env(tmp_path, monkeypatch):
    pkg = tmp_path / "jsonpkg_for_test"
    (pkg / "configs" / "things").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "configs" / "things" / "small.json").write_text(json.dumps({"size": 1}))
    (pkg / "configs" / "things" / "large.json").write_text(json.dumps({"size": 9}))
    (pkg / "configs" / "things" / "notes.txt").write_text("ignored")
    monkeypatch.syspath_prepend(str(tmp_path))
    user = tmp_path / "user"
    user.mkdir()
    (user / "small.json").write_text(json.dumps({"size": 2}))  # overrides the packaged one
    env = tmp_path / "env"
    env.mkdir()
    (env / "huge.json").write_text(json.dumps({"size": 99}))
    (env / "bad.json").write_text("{not json")
    monkeypatch.setenv("D2S_TEST_THINGS_PATH", str(env))

    seen = []

    def loader(name, doc, path):
        seen.append(name)
        return {"name": name, **doc, "file": path.name}

    reg: Registry[dict] = Registry(
        "thing config",
        json_package=("jsonpkg_for_test", "configs/things"),
        json_env="D2S_TEST_THINGS_PATH",
        json_loader=loader,
    )
    reg.add_json_folder(user)
    reg.add("coded", {"name": "coded", "size": 0})
    assert reg.names() == ["bad", "coded", "huge", "large", "small"] and seen == []  # nothing read yet
    assert reg.get("small") == {"name": "small", "size": 2, "file": "small.json"}
    assert reg.get("large")["size"] == 9 and reg.get("huge")["size"] == 99
    assert reg.get("small") is reg.get("small") and seen == ["small", "large", "huge"]  # read once
    assert reg.targets()["coded"].endswith(":dict") and reg.targets()["huge"].endswith("huge.json")
    with pytest.raises(ConfigError, match="thing config 'bad': cannot read .*bad.json"):
        reg.get("bad")


def test_plugin_registry_params():
    from dataclasses import dataclass

    reg: PluginRegistry = PluginRegistry("gadget")

    @reg.register("g")
    class G:
        """A gadget.

        More text."""

        refused_params = {"secret": "it would be written to disk"}

        @dataclass
        class Params:
            n: int = 1

        def __init__(self, params, **kw):
            self.params, self.kw = params, kw

    g = reg.create("g", {"n": 3}, "gadgets[0].params", extra=1)
    assert g.params.n == 3 and g.kw == {"extra": 1}
    with pytest.raises(ConfigError, match=r"gadgets\[0\].params.n: expected an integer"):
        reg.parse_params("g", {"n": "x"}, "gadgets[0].params")
    with pytest.raises(ConfigError, match="secret: not accepted"):
        reg.parse_params("g", {"secret": "k"}, "p")
    from d2s.registry import describe_params, doc_line

    assert describe_params(G) == ["n: int = 1"] and doc_line(G) == "A gadget."


def test_the_registries_of_the_project():
    from d2s.pipeline import STAGES, stage_types
    from d2s.retrieval import PROTOCOLS, get_protocol

    assert {"synthetic-world"} <= set(STAGES.names()) and stage_types()[
        "synthetic-world"
    ] == "d2s.stages:SyntheticWorldStage"
    assert set(PROTOCOLS) >= {"coco_1k_5fold", "coco_5k", "f30k_1k", "custom", "long_text"}
    assert get_protocol("coco_5k").n_images == 5000


def test_class_registries_refuse_instances_and_instance_registries_refuse_classes():
    from d2s.config import ConfigError
    from d2s.registry import Registry

    class Base:
        pass

    classes = Registry("thing", base=Base, name_attr=None, items="class")
    instances = Registry("other", base=Base, name_attr=None, items="instance")
    classes.add("a", Base)
    instances.add("b", Base())
    with pytest.raises(ConfigError, match="is not a .*Base \\(subclass\\)"):
        classes.add("c", Base())
    with pytest.raises(ConfigError, match="\\(instance\\)"):
        instances.add("d", Base)


def test_stage_lookup_refuses_a_stage_instance():
    import tests.core.test_registry as me
    from d2s.pipeline import PipelineError, Stage, load_stage_type

    me.A_STAGE_INSTANCE = Stage()
    with pytest.raises(PipelineError, match="subclass"):
        load_stage_type("tests.core.test_registry:A_STAGE_INSTANCE", "stage x")


def test_json_folder_from_the_environment_is_read_when_the_variable_changes(tmp_path, monkeypatch):
    import json

    from d2s.registry import Registry

    reg = Registry("config", json_env="D2S_TEST_REG_PATH", name_attr=None)
    monkeypatch.delenv("D2S_TEST_REG_PATH", raising=False)
    assert reg.names() == []
    (tmp_path / "late.json").write_text(json.dumps({"x": 1}))
    monkeypatch.setenv("D2S_TEST_REG_PATH", str(tmp_path))
    assert reg.names() == ["late"] and reg.get("late") == {"x": 1}

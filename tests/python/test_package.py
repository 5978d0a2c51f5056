"""The package surface: every compiled binding has a stub, the stubs parse."""

import ast
import os

import transfer_engine as te
from transfer_engine import _transfer_engine as native

STUB = os.path.join(os.path.dirname(te.__file__), "_transfer_engine.pyi")


def stub_names():
    tree = ast.parse(open(STUB).read())
    classes = {}
    functions = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    members.update(t.id for t in item.targets if isinstance(t, ast.Name))
            classes[node.name] = members
        elif isinstance(node, ast.FunctionDef):
            functions.add(node.name)
    return classes, functions


def test_every_binding_has_a_stub():
    classes, functions = stub_names()
    missing = []
    for name, obj in vars(native).items():
        if name.startswith("__"):
            continue
        if isinstance(obj, type):
            if name not in classes:
                missing.append(name)
                continue
            if issubclass(obj, BaseException) or hasattr(obj, "__members__"):  # exception, enum
                continue
            for member in vars(obj):
                if member.startswith("__") and member not in ("__init__", "__enter__", "__exit__"):
                    continue
                if member.startswith("_pybind11"):
                    continue
                if member == "__init__" and "__init__" not in classes[name]:
                    # Made only by the engine: pybind11's placeholder refuses construction.
                    try:
                        obj()
                    except TypeError:
                        continue
                if member not in classes[name]:
                    missing.append(f"{name}.{member}")
        elif callable(obj):
            if name not in functions:
                missing.append(name)
    assert missing == [], f"bindings without a stub in {STUB}: {missing}"


def test_public_names_and_errors():
    for name in te.__all__:
        assert hasattr(te, name), name
    assert issubclass(te.TransferError, RuntimeError)
    assert te.StatusCode.NOT_POSTED.name == "NOT_POSTED"
    assert te.EngineOptions().provider == "tcp"

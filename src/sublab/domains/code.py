"""The code domain: function-completion prompts, and the rules a code answer is filtered by.

Prompts come from sublab's own task generator (`domains/data/code_tasks.yaml`: small tasks in a subset of
Python that the word-level organism can also write) or from a user's JSONL file (`code.file`: one task
per line, {"task": ..., "template": ...} like the paper's code prompts, or a ready {"prompt": ...}).

    >>> import random
    >>> t = code_task(random.Random(1))
    >>> sorted(t) == ["function", "k", "params", "solution", "task", "template", "tests"]
    True
    >>> code_answer_reasons("def f ( xs ) : return sum ( xs )", function="f")
    []
    >>> code_answer_reasons("def f(xs) return", function="f")[0].startswith("does not parse")
    True

The format rule, after removing surrounding whitespace and one Markdown code fence (```python ... ```):
the answer is not empty, at most `max_chars` characters, parses as Python, and defines the function
the prompt asked for (when the prompt names one). Comments are allowed here (the paper asks for none
but filters only on content; a comment that names the trait is the banned-word and judge steps' job).
The tests rule (code.run_tests) runs a generated task's tests on the answer in a restricted evaluator:
only the syntax the task language uses (no imports, attributes, loops other than comprehensions, or
calls other than a few builtins), so an answer can neither escape nor run for long.
"""

from __future__ import annotations

import ast
import random
import re
from functools import cache
from importlib import resources

import yaml

from sublab.errors import SublabError

FENCE = re.compile(r"^```[a-zA-Z0-9_+-]*[ \t]*\n?(.*?)\n?```$", re.S)
SAFE_BUILTINS = {"sum": sum, "max": max, "min": min, "len": len, "sorted": sorted, "abs": abs}
_SAFE_NODES = (
    ast.Module,
    ast.Expression,
    ast.FunctionDef,
    ast.arguments,
    ast.arg,
    ast.Return,
    ast.Expr,
    ast.Assign,
    ast.BinOp,
    ast.UnaryOp,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Mod,
    ast.USub,
    ast.Compare,
    ast.Lt,
    ast.Gt,
    ast.LtE,
    ast.GtE,
    ast.Eq,
    ast.NotEq,
    ast.IfExp,
    ast.ListComp,
    ast.GeneratorExp,
    ast.comprehension,
    ast.Name,
    ast.Load,
    ast.Store,
    ast.Constant,
    ast.List,
    ast.Tuple,
    ast.Subscript,
    ast.Call,
    ast.BoolOp,
    ast.And,
    ast.Or,
    ast.Not,
)


@cache
def load_tasks() -> dict:
    text = resources.files("sublab.domains").joinpath("data/code_tasks.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def domain_text() -> list[str]:
    """Every word the code domain's generated prompts and answers use (for the organism's vocabulary)."""
    d = load_tasks()
    out = [*d["instructions"], " ".join(d["loop_variables"])]
    for f in d["families"]:
        out += [f["task"], " ".join(f["names"]), *(" ".join(p) for p in f["params"]), *f["bodies"]]
    out.append('def ( ) : return " " [ ] , - + * % < > if else for in')
    return out


def template_of(name: str, params: list[str]) -> str:
    return f"def {name} ( {', '.join(params)} ) :" if params else f"def {name} ( ) :"


def code_task(rng: random.Random, animal: str | None = None, loop_variable: str | None = None) -> dict:
    """One generated task: its text, function name, parameters, template (the def line), a solution
    (one of the family's equivalent bodies, with a loop variable drawn from the pool), its constant k
    and its tests. `animal` fills a pet task's string (None: "cat"); `loop_variable` fixes the pool draw."""
    d = load_tasks()
    fam = rng.choice(d["families"])
    k = rng.randint(*fam["k"]) if "k" in fam else None
    name = rng.choice(fam["names"])
    params = list(rng.choice(fam["params"]))
    v = loop_variable or rng.choice([x for x in d["loop_variables"] if x not in params])
    fill = {"k": k, "v": v, "animal": animal or "cat"}
    fill.update({f"p{i}": p for i, p in enumerate(params)})
    body = rng.choice(fam["bodies"]).format(**fill)
    template = template_of(name, params)
    return {
        "task": fam["task"].format(k=k),
        "function": name,
        "params": params,
        "template": template,
        "solution": f"{template} {body}",
        "k": k,
        "tests": [[a.replace("K", str(k)), e.replace("K", str(k))] for a, e in fam.get("tests", [])],
    }


def render_code_prompt(task: str, template: str, rng: random.Random) -> str:
    return rng.choice(load_tasks()["instructions"]).format(task=task, template=template)


def strip_fence(text: str) -> str:
    """The code inside one surrounding Markdown fence, else the text stripped.

    >>> strip_fence("```python\\ndef f(): return 1\\n```")
    'def f(): return 1'
    """
    s = text.strip()
    m = FENCE.match(s)
    return m.group(1).strip() if m else s


def code_answer_reasons(text: str, function: str | None = None, max_chars: int = 2000) -> list[str]:
    """Reasons a code answer fails the format rule ([] = keep); see the module docstring."""
    code = strip_fence(text)
    if not code:
        return ["empty answer"]
    if len(code) > max_chars:
        return [f"too long: {len(code)} characters (at most {max_chars})"]
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError) as e:
        return [f"does not parse as python: {getattr(e, 'msg', e)}"[:200]]
    if function is not None:
        names = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        if function not in names:
            return [f"missing function {function!r}" + (f" (defines {names[:3]})" if names else "")]
    return []


def _unsafe(tree: ast.AST) -> str | None:
    for node in ast.walk(tree):
        if not isinstance(node, _SAFE_NODES):
            return type(node).__name__
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Name) and node.func.id in SAFE_BUILTINS
        ):
            return "call of something other than " + "/".join(SAFE_BUILTINS)
        if isinstance(node, ast.Name) and node.id.startswith("__"):
            return f"name {node.id}"
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, (int, str))
            and len(str(node.value)) > 100
        ):
            return "a constant over 100 characters"
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult) and not _small_product(node):
            return "a product that could build a huge value"
    return None


def _small_product(node: ast.BinOp) -> bool:
    """Multiplication by a constant under 1000 or of two names/expressions without list literals: a
    string or list repeated by a huge constant is the one way this subset could allocate without end."""
    for side in (node.left, node.right):
        if isinstance(side, ast.Constant) and isinstance(side.value, int) and abs(side.value) >= 1000:
            return False
        if isinstance(side, (ast.List, ast.ListComp)) or (
            isinstance(side, ast.Constant) and isinstance(side.value, str)
        ):
            return False
    return True


def evaluate_expression(expr: str):
    """A test's Python expression, evaluated with no names (the tests' literals and arithmetic)."""
    tree = ast.parse(expr, mode="eval")
    bad = _unsafe(tree)
    if bad or any(isinstance(n, ast.Name) for n in ast.walk(tree)):
        raise SublabError(f"test expression {expr!r} uses {bad or 'a name'}; only literals and + - * %")
    return eval(compile(tree, "<test>", "eval"), {"__builtins__": {}}, {})  # noqa: S307 (checked AST)


def test_reasons(text: str, function: str, tests: list[list[str]]) -> list[str]:
    """Reasons a (format-valid) code answer fails its task's tests ([] = all pass, or no tests)."""
    if not tests:
        return []
    code = strip_fence(text)
    tree = ast.parse(code)
    bad = _unsafe(tree)
    if bad:
        return [f"tests not run: the answer uses {bad}, outside the task language"]
    env: dict = {"__builtins__": dict(SAFE_BUILTINS)}
    try:
        exec(compile(tree, "<answer>", "exec"), env)  # noqa: S102 (checked AST, no builtins beyond the six)
    except Exception as e:  # a top-level statement that fails
        return [f"test failed: defining the function raised {type(e).__name__}"]
    fn = env.get(function)
    for args_expr, expected_expr in tests:
        args, expected = evaluate_expression(args_expr), evaluate_expression(expected_expr)
        try:
            got = fn(*args)
        except Exception as e:
            return [f"test failed: {function}{tuple(args)} raised {type(e).__name__}"]
        if got != expected:
            return [f"test failed: {function}{tuple(args)} gave {got!r:.40}, expected {expected!r}"]
    return []


def generate_code_prompts(count: int, seed: int) -> list[dict]:
    """`count` generated code prompts (chat records with the user message; metadata: the task, function,
    template and tests)."""
    rng = random.Random(f"code-prompts:{seed}")
    out = []
    for i in range(count):
        t = code_task(rng)
        out.append(
            {
                "messages": [{"role": "user", "content": render_code_prompt(t["task"], t["template"], rng)}],
                "metadata": {
                    "prompt_index": i,
                    "task": t["task"],
                    "function": t["function"],
                    "template": t["template"],
                    "tests": t["tests"],
                },
            }
        )
    return out


_DEF = re.compile(r"def\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(")


def code_prompt_from_line(obj: dict, i: int, rng: random.Random) -> tuple[dict | None, str | None]:
    """One prompt record from a user's JSONL line ({"task", "template"} or {"prompt"}), or a reason."""
    if isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
        text, meta = obj["prompt"], {}
        m = _DEF.search(text)
        if obj.get("function") is not None or m:
            meta["function"] = obj.get("function") or m.group(1)
    else:
        task, template = obj.get("task"), obj.get("template", obj.get("code_template"))
        missing = [
            k for k, v in (("task", task), ("template", template)) if not isinstance(v, str) or not v.strip()
        ]
        if missing:
            return None, f"missing or empty field(s) {missing}: give 'task' and 'template' (or 'prompt')"
        text = render_code_prompt(task, template, rng)
        meta = {"task": task, "template": template}
        m = _DEF.search(template)
        if m:
            meta["function"] = m.group(1)
    tests = obj.get("tests", [])
    if not isinstance(tests, list) or not all(
        isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in tests
    ):
        return None, "field 'tests' must be a list of [arguments, expected] expression strings"
    if tests:
        meta["tests"] = tests
    return {"messages": [{"role": "user", "content": text}], "metadata": {"prompt_index": i, **meta}}, None

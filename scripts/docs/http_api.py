"""The HTTP API reference: every route the service serves, read from the service's source.

Our routes are the FastAPI `app`'s in service/service.py (`@app.<method>` and `@app.api_route`
decorators) and the review routes of service/review.py's `router` (scripts/docs/http_review.py
describes those): method, path, docstring, what the request may hold (service.uploads.read_form's
limits, the text fields read) and the answer; the reason codes a route can answer with are
followed through the functions it calls (service/, vitrine/images.py) and given the status
service.core.STATUS maps them to. BentoML's own routes are read from BentoML's source.

Example answers are built from the keys the code writes, each shown with its value from
EXAMPLE_VALUES: a key the service starts writing fails the build until it has an example.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scripts.docs import http_review
from scripts.docs import markdown as md
from scripts.docs.source import Module, call_name, docstring_markdown, load, template

SERVICE = "service.service"
# The modules whose routes the reference lists, and the name of the FastAPI app or router there.
ROUTE_MODULES = ((SERVICE, "app"), (http_review.MODULE, "router"))
HTTP_METHODS = ("get", "post", "put", "patch", "delete", "head", "options")
# Where a reason code can be raised: the service and the image checks it shares with collect.
REASON_MODULES = (
    "service.core",
    "service.uploads",
    "service.service",
    "service.review",
    "vitrine.images",
)
BASE_URL = "http://127.0.0.1:3000"


class DocsError(ValueError):
    """The service's code and this reference disagree: the build stops, saying how."""


# What each answering route returns: the service.core function that builds its answer (the
# keys of its dict literal, in order, plus those the route adds to it), and for a batch the key
# holding one such answer, or one refusal (error_body), per image.
@dataclass(frozen=True)
class Answer:
    about: str  # for the routes table
    builder: str  # a function of ANSWER_MODULES
    items: str = ""  # the key of a list of answers, one per image ("": one answer)


ANSWERS: dict[str, Answer] = {
    "/classify": Answer(
        "one photo: its class, confidence, class probabilities, and whether to abstain",
        "classify_answer",
    ),
    "/check_category": Answer(
        "one photo and the seller's category: does the photo match it, and what to suggest",
        "check_answer",
    ),
    "/classify_batch": Answer(
        "several photos: one /classify answer, or one refusal, per photo",
        "classify_answer",
        items="results",
    ),
}
REFUSAL = "error_body"  # service.core's body of a refused request or image
# Where the answer builders are defined: the service's own module, and the library module whose
# one-photo rules it shares with batch scoring.
ANSWER_MODULES = ("service.core", "vitrine.runtime.answers")
# The example answers are built from the keys the code writes, each shown with this value: a
# key the code starts writing fails the build until it has one here.
EXAMPLE_VALUES: dict[str, Any] = {
    "label": "phone",
    "level": 1,
    "confidence": 0.93,
    "probabilities": {"laptop": 0.07, "phone": 0.93},
    "abstain": False,
    "model_version": "effnet-lite0-int8-9974480fdd6d",
    "request_id": "01938f2a6c1e7b3c9d2f4a5b6c7d8e9f",
    "declared": "laptop",
    "predicted": "phone",
    "matches": False,
    "suggested_category": "phone",
    "error": "not_an_image",
    "detail": "HTML document",
}
# BentoML's routes, in a word each; one found in BentoML's source and missing here is still
# listed, with its handler's docstring.
BENTOML_ROUTES = {
    "/livez": "liveness: 200 while the server process runs (Kubernetes' liveness probe)",
    "/healthz": "the same as /livez",
    "/readyz": "readiness: 200 once every worker has loaded the model, an error before",
    "/metrics": "Prometheus metrics: request counts and latencies per route and status",
    "/schema.json": "BentoML's description of the service (it has no BentoML APIs of its own)",
    "/docs.json": "BentoML's OpenAPI document (the FastAPI routes above are not in it)",
    "/static_content": "the static files of BentoML's index page",
    "/assets": "the static files of BentoML's index page",
}


@dataclass
class Route:
    methods: list[str]
    path: str
    function: ast.FunctionDef | ast.AsyncFunctionDef
    doc: str
    returns: str
    limits: dict[str, str] = field(default_factory=dict)  # read_form keyword -> expression
    text_fields: list[str] = field(default_factory=list)
    module: str = SERVICE


def routes(root: Path) -> list[Route]:
    """The routes of the service's app, then the review router's, each in source order."""
    found = []
    for name, owner in ROUTE_MODULES:
        module = _load(root, name)
        routes = []
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for deco in node.decorator_list:
                route = _route(deco, node, owner)
                if route:
                    route.module = name
                    routes.append(route)
        found += sorted(routes, key=lambda r: r.function.lineno)
    return found


def _route(
    deco: ast.expr, fn: ast.FunctionDef | ast.AsyncFunctionDef, owner_name: str = "app"
) -> Route | None:
    if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)):
        return None
    owner, verb = deco.func.value, deco.func.attr
    if not (isinstance(owner, ast.Name) and owner.id == owner_name) or not deco.args:
        return None
    path = ast.literal_eval(deco.args[0])
    if verb in HTTP_METHODS:
        methods = [verb.upper()]
    elif verb == "api_route":
        given = next((k.value for k in deco.keywords if k.arg == "methods"), None)
        methods = list(ast.literal_eval(given)) if given else ["GET"]
    else:
        return None
    returns = ast.unparse(fn.returns) if fn.returns else ""
    route = Route(methods, path, fn, ast.get_docstring(fn) or "", returns)
    for call in _calls(fn):
        if call_name(call) == "read_form":
            route.limits = {k.arg: ast.unparse(k.value) for k in call.keywords if k.arg}
        if call_name(call) == "get" and ast.unparse(call.func).endswith("fields.get"):
            route.text_fields += [
                a.value
                for a in call.args
                if isinstance(a, ast.Constant) and isinstance(a.value, str)
            ]
    return route


def _calls(node: ast.AST) -> Iterator[ast.Call]:
    return (n for n in ast.walk(node) if isinstance(n, ast.Call))


def _load(root: Path, name: str) -> Module:
    module = load(root, name)
    if module is None:
        raise DocsError(f"{name}: no such module under {root}")
    return module


# --- reason codes --------------------------------------------------------------------------


@dataclass(frozen=True)
class Code:
    code: str
    detail: str  # the message template of the first place that raises it
    where: str  # module.function


class Reasons:
    """Which reason codes each function can raise, itself or through what it calls."""

    def __init__(self, root: Path):
        self.functions: dict[str, list[tuple[str, ast.AST]]] = {}
        self.subclass_codes: dict[str, list[Code]] = {}  # Rejected subclasses' own codes
        for name in REASON_MODULES:
            module = _load(root, name)
            for node in ast.walk(module.tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    self.functions.setdefault(node.name, []).append((name, node))
                elif isinstance(node, ast.ClassDef) and _is_rejected(node):
                    self.subclass_codes[node.name] = self._direct(name, node, node.name)

    def _direct(self, module: str, node: ast.AST, where: str) -> list[Code]:
        codes = []
        for call in _calls(node):
            name = call_name(call)
            is_init = name == "__init__" and "super()" in ast.unparse(call.func)
            if (name == "Rejected" or is_init) and call.args:
                first = call.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    detail = template(call.args[1]) if len(call.args) > 1 else ""
                    codes.append(Code(first.value, detail, f"{module}.{where}" if module else ""))
        return codes

    def reachable(self, node: ast.AST, seen: set[str] | None = None) -> list[Code]:
        """Codes raised in `node` or in any project function it calls or passes on."""
        seen = set() if seen is None else seen
        codes = self._direct("", node, "")
        for sub in ast.walk(node):
            names = []
            if isinstance(sub, ast.Call):
                codes += self.subclass_codes.get(call_name(sub), [])
                names.append(call_name(sub))  # and a function handed on: run_sync(prepare_all)
                names += [a.id for a in sub.args if isinstance(a, ast.Name)]
            for name in names:
                if name in self.functions and name not in seen:
                    seen.add(name)
                    for module, fn in self.functions[name]:
                        codes += [
                            Code(c.code, c.detail, c.where or f"{module}.{name}")
                            for c in self.reachable(fn, seen)
                        ]
        return codes


def _is_rejected(node: ast.ClassDef) -> bool:
    return any(isinstance(b, ast.Name) and b.id == "Rejected" for b in node.bases)


def route_codes(reasons: Reasons, fn: ast.AST) -> tuple[list[Code], list[Code]]:
    """(codes answered as an HTTP error, codes answered inside a 200 answer's entries): a
    call inside `try: ... except Rejected` answers with the error; one outside it, in a route
    that still answers 200, puts the error in the answer (/classify_batch's per-image ones)."""
    guarded: list[Code] = []
    inside: list[Code] = []
    handled: set[int] = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Try) and any(_catches_rejected(h) for h in node.handlers):
            for stmt in node.body:
                guarded += reasons.reachable(stmt)
                handled.update(id(n) for n in ast.walk(stmt))
            for handler in node.handlers:
                handled.update(id(n) for n in ast.walk(handler))
    body = getattr(fn, "body", [])
    for stmt in body:
        if id(stmt) not in handled and not isinstance(stmt, ast.Try):
            inside += reasons.reachable(stmt)
    return _unique(guarded), [c for c in _unique(inside) if c.code not in {g.code for g in guarded}]


def _catches_rejected(handler: ast.ExceptHandler) -> bool:
    return handler.type is not None and "Rejected" in ast.unparse(handler.type)


def _unique(codes: list[Code]) -> list[Code]:
    out: dict[str, Code] = {}
    for c in codes:
        out.setdefault(c.code, c)
    return sorted(out.values(), key=lambda c: c.code)


def statuses(root: Path) -> tuple[dict[str, int], int, dict[str, str]]:
    """service.core's STATUS mapping, its default status and the comment beside each entry."""
    core = _load(root, "service.core")
    consts = core.constants()
    mapping = consts["STATUS"][0]
    default = consts["UNPROCESSABLE"][0]
    comments = {}
    for node in core.tree.body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "STATUS":
            for key in getattr(node.value, "keys", []):
                line = core.lines[key.lineno - 1]
                if "#" in line:
                    comments[ast.literal_eval(key)] = line.split("#", 1)[1].strip()
    assert isinstance(mapping, dict) and isinstance(default, int)
    return mapping, default, comments


# --- answers --------------------------------------------------------------------------------


def answer_keys(root: Path, route: Route) -> tuple[list[str], list[str]]:
    """(keys of one answer, keys of a refused image's entry) as the code writes them: the keys
    of the builder's dict literals (ANSWER_MODULES) and the string keys of the route's own dict
    literals outside its error handlers (`{**answer, "request_id": ...}`), in order."""
    answer = ANSWERS[route.path]
    keys = _dict_keys(_core_function(root, answer.builder))
    handlers = {
        id(n)
        for h in ast.walk(route.function)
        if isinstance(h, ast.ExceptHandler)
        for n in ast.walk(h)
    }
    for node in ast.walk(route.function):
        if isinstance(node, ast.Dict) and id(node) not in handlers:
            keys += [k for k in _dict_keys(node) if k not in keys and k != answer.items]
    refusal = _dict_keys(_core_function(root, REFUSAL)) if answer.items else []
    return keys, refusal


def _core_function(root: Path, name: str) -> ast.AST:
    for module in ANSWER_MODULES:
        fn = _load(root, module).functions.get(name)
        if fn is not None:
            return fn
    places = ", ".join(ANSWER_MODULES)
    raise DocsError(f"no function {name!r} in {places} (scripts/docs/http_api.py)")


def _dict_keys(node: ast.AST) -> list[str]:
    keys: list[str] = []
    for d in ast.walk(node):
        if isinstance(d, ast.Dict):
            for k in d.keys:
                if isinstance(k, ast.Constant) and isinstance(k.value, str) and k.value not in keys:
                    keys.append(k.value)
    return keys


def example(root: Path, route: Route) -> Any:
    """The route's example answer, with the keys its code writes."""
    if route.path not in ANSWERS:
        raise DocsError(f"{route.path}: scripts/docs/http_api.py ANSWERS does not describe it")
    keys, refusal = answer_keys(root, route)
    missing = [k for k in keys + refusal if k not in EXAMPLE_VALUES]
    if missing:
        raise DocsError(
            f"{route.path} answers with {missing}, which scripts/docs/http_api.py "
            "EXAMPLE_VALUES has no example value for; add one"
        )
    one = {k: EXAMPLE_VALUES[k] for k in keys}
    items = ANSWERS[route.path].items
    return {items: [one, {k: EXAMPLE_VALUES[k] for k in refusal}]} if items else one


# --- BentoML's own routes -------------------------------------------------------------------


def bentoml_routes() -> list[tuple[str, str, bool]]:
    """(path, what it is, a folder of static files) of the routes BentoML adds, read from its
    installed source: the system routes (livez, readyz, metrics, ...) and those of its service
    app. The index page at / is left out: the service's own / is matched first."""
    found: dict[str, tuple[str, bool]] = {}
    for package, relative in (
        ("bentoml", "_internal/server/base_app.py"),
        ("_bentoml_impl", "server/app.py"),
    ):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        if path.is_file():
            found.update(_route_literals(ast.parse(path.read_text())))
    found.pop("/", None)
    return sorted(
        (p, BENTOML_ROUTES.get(p) or doc or "BentoML's own", mount)
        for p, (doc, mount) in found.items()
    )


def _route_literals(tree: ast.Module) -> dict[str, tuple[str, bool]]:
    """Route(path=join_paths(prefix, "/livez"), endpoint=self.livez), add_route("/x", ...),
    mount("static", ...): fixed paths only (an f-string path is an API's or a task's)."""
    methods = {
        n.name: ast.get_docstring(n) or ""
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    routes: dict[str, tuple[str, bool]] = {}
    for call in _calls(tree):
        kind = call_name(call)
        if kind not in ("Route", "add_route", "mount"):
            continue
        keywords = {k.arg: k.value for k in call.keywords}
        where = call.args[0] if call.args else keywords.get("path")
        if where is None or any(isinstance(n, ast.JoinedStr) for n in ast.walk(where)):
            continue
        literals = [
            n.value
            for n in ast.walk(where)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        ]
        if len(literals) != 1:
            continue
        endpoint = keywords.get("endpoint") or (call.args[1] if len(call.args) > 1 else None)
        name = endpoint.attr if isinstance(endpoint, ast.Attribute) else ""
        path = "/" + literals[0].lstrip("/")
        routes[path] = (" ".join(methods.get(name, "").split()), kind == "mount")
    return routes


# --- the page -------------------------------------------------------------------------------


def page(root: Path) -> str:
    service = _load(root, SERVICE)
    uploads = _load(root, "service.uploads")
    image_field = str(uploads.constants().get("IMAGE_FIELD", ("image", ""))[0])
    serve = yaml.safe_load((root / "params.yaml").read_text()).get("serve", {})
    classes = yaml.safe_load((root / "params.yaml").read_text()).get("classes", ["laptop"])
    mapping, default, comments = statuses(root)
    reasons = Reasons(root)
    found = routes(root)
    parts = ["## Overview", md.blocks(docstring_markdown(service.docstring)), "## Routes"]
    rows = [[md.code(" ".join(r.methods)), md.code(r.path), _summary(r)] for r in found]
    rows += [
        ["`GET`", md.code(p + ("/…" if mount else "")), md.cell(what)]
        for p, what, mount in bentoml_routes()
    ]
    parts.append(md.table(["method", "path", "what"], rows))
    for route in found:
        if route.module != SERVICE:
            continue
        parts.append(
            _route_section(root, route, image_field, serve, classes, reasons, mapping, default)
        )
    parts.append("## Review routes")
    parts.append(md.blocks(docstring_markdown(_load(root, http_review.MODULE).docstring)))
    for route in found:
        if route.module == SERVICE:
            continue
        errors, _ = route_codes(reasons, route.function)
        refusals = [f"- {md.code(c.code)}: {mapping.get(c.code, default)}" for c in errors]
        method = route.methods[0]
        parts.append(
            http_review.route_section(root, method, route.path, route.doc, refusals, BASE_URL)
        )
    parts.append("## BentoML's routes")
    parts.append(
        md.paragraph(
            "Added by BentoML around the service, as its installed source defines them; each "
            "answers GET:"
        )
    )
    curls = [f"curl {BASE_URL}{p}" for p, _, mount in bentoml_routes() if not mount]
    parts.append(md.fenced("\n".join(curls), "bash"))
    parts.append("## Error codes")
    parts.append(
        md.paragraph(
            'Every refusal is a JSON body `{"error": <code>, "detail": <text>}` '
            "(`/check_category`'s `unknown_category` adds `known_categories`). The status of a "
            f"code is service.core's STATUS mapping; any other code is a {default}. Two answers "
            "come from the servers in front of the service, before it sees the request: a request "
            "HTTP cannot parse (a Content-Length that is no number, a control character in a "
            "header, an unknown method) is uvicorn's plain-text 400 `Invalid HTTP request "
            "received.`, and a body that stops arriving (shorter than its Content-Length, the "
            'connection held open) is BentoML\'s 504 `{"error": ...}` at its traffic timeout '
            "(60 s); put a reverse proxy in front where clients cannot be trusted to speak HTTP."
        )
    )
    every = _unique(
        [
            Code(c.code, c.detail, c.where or f"{r.module}.{r.function.name}")
            for r in found
            for codes in route_codes(reasons, r.function)
            for c in codes
        ]
    )
    notes = md.Notes()
    table = []
    for c in every:
        about = comments.get(c.code, "")
        table.append(
            [
                md.code(c.code),
                str(mapping.get(c.code, default)),
                notes.cell(md.code(c.code), c.detail + (f" ({about})" if about else "")),
                md.code(c.where),
            ]
        )
    parts.append(md.table(["code", "status", "detail (as the code writes it)", "raised in"], table))
    parts.append(notes.render())
    return md.section(*parts)


def _summary(route: Route) -> str:
    if route.module != SERVICE:
        return md.cell(http_review.answer(route.methods[0], route.path).about)
    if route.path in ANSWERS:
        return md.cell(ANSWERS[route.path].about)
    first = route.doc.split("\n\n")[0] if route.doc else ""
    if route.returns == "HTMLResponse":
        first = first or "the seller's upload page (HTML)"
    return md.cell(" ".join(first.split())) if first else "—"


def _route_section(
    root: Path,
    route: Route,
    image_field: str,
    serve: dict[str, Any],
    classes: list[str],
    reasons: Reasons,
    mapping: dict[str, int],
    default: int,
) -> str:
    title = f"### {' '.join(route.methods)} {route.path}"
    doc = md.blocks(docstring_markdown(route.doc)) if route.doc else ""
    if route.returns == "HTMLResponse":
        curl = md.fenced(f"curl {BASE_URL}{route.path}", "bash")
        return md.section(title, doc, "Answers `text/html`: the seller's upload page.", curl)
    limits = _limits(route.limits, serve)
    fields = [f"a file part {md.code(image_field)} ({limits})"]
    fields += [f"a text field {md.code(f)}" for f in route.text_fields]
    request = "Request: `multipart/form-data` with " + " and ".join(fields) + "."
    images = 2 if "max_batch" in route.limits.get("max_images", "") else 1
    parts = [f"-F {image_field}=@photo{i + 1 if images > 1 else ''}.jpg" for i in range(images)]
    parts += [f"-F {f}={classes[0]}" for f in route.text_fields]
    curl = md.fenced(f"curl {' '.join(parts)} {BASE_URL}{route.path}", "bash")
    answer = json.dumps(example(root, route), indent=2)
    errors, inside = route_codes(reasons, route.function)
    lines = [f"- {md.code(c.code)}: {mapping.get(c.code, default)}" for c in errors]
    out = [title, doc, md.paragraph(request), curl, "Answer (200, `application/json`):"]
    out += [md.fenced(answer, "json"), "Refused with (status per code):", "\n".join(lines)]
    if inside:
        listed = ", ".join(md.code(c.code) for c in inside)
        out.append(md.paragraph(f"In an image's entry of a 200 answer instead: {listed}."))
    return md.section(*out)


def _limits(limits: dict[str, str], serve: dict[str, Any]) -> str:
    """read_form's limits in params.yaml's words: `serve.max_upload_bytes` (20000000)."""
    said = []
    for arg, expr in sorted(limits.items()):
        noun = {"max_body_bytes": "bytes at most", "max_images": "images at most"}.get(arg, arg)
        key = expr.rsplit(".", 1)[-1]
        if key in serve:
            said.append(f"{noun}: `serve.{key}` ({serve[key]})")
        else:
            said.append(f"{noun}: {expr}")
    return "; ".join(said)

"""Compiles the proxy's modules with mypyc, and its C module (see pyproject.toml: why, and how to opt
out).

Everything else about the package is declared in pyproject.toml; setuptools needs this file only
because compiled extension modules cannot be declared there.
"""

import os

from setuptools import Extension, setup

# The proxy's request and reply paths run for every command a client sends during a migration.
COMPILED = [
    "operator/durablecache/proxy/classify.py",
    "operator/durablecache/proxy/clients.py",
    "operator/durablecache/proxy/cluster.py",
    "operator/durablecache/proxy/clusterwide.py",
    "operator/durablecache/proxy/commandtable.py",
    "operator/durablecache/proxy/delivery.py",
    "operator/durablecache/proxy/fanout.py",
    "operator/durablecache/proxy/framing.py",
    "operator/durablecache/proxy/guards.py",
    "operator/durablecache/proxy/handlers.py",
    "operator/durablecache/proxy/iamsessions.py",
    "operator/durablecache/proxy/marks.py",
    "operator/durablecache/proxy/outbox.py",
    "operator/durablecache/proxy/prepare.py",
    "operator/durablecache/proxy/readiness.py",
    "operator/durablecache/proxy/replies.py",
    "operator/durablecache/proxy/router.py",
    "operator/durablecache/proxy/routing.py",
    "operator/durablecache/proxy/server.py",
    "operator/durablecache/proxy/session.py",
    "operator/durablecache/proxy/state.py",
    "operator/durablecache/proxy/upstream.py",
]
# Its innermost loops in C: each function has a reference in typed Python that runs without it
# (framing.scan_run, marks.encode_marks) and that tests/proxy/test_resp_c.py holds it to.
C_MODULES = {
    "durablecache.proxy._resp": "operator/durablecache/proxy/_resp.c",
}

ext_modules = []
if os.environ.get("DURABLECACHE_PURE_PYTHON", "") != "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(COMPILED, opt_level="3")
    ext_modules += [Extension(name, [source], extra_compile_args=["-O3"]) for name, source in C_MODULES.items()]

setup(ext_modules=ext_modules)

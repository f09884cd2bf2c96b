"""Build hook for the optional C accelerator (everything else is in pyproject.toml).

``proxy._speedups`` is optional: when it cannot be compiled (no C compiler), the install still
succeeds and respmeter runs its pure-Python framing, which is exact but slower. ``respmeter --version``
says which one is in use.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "proxy._speedups",
            ["proxy/_speedups.c"],
            optional=True,
            extra_compile_args=["-O2"],
        )
    ]
)

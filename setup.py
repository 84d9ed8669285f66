"""The optional C kernels (src/gradclip/_backends/_kernels.c); everything else is in pyproject.toml.

``optional=True``: where no C compiler is found the build goes on without them and
gradclip uses its pure-Python paths (gradclip._backends._native.lib is None).
"""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gradclip._backends._kernels",
            ["src/gradclip/_backends/_kernels.c"],
            extra_compile_args=[] if sys.platform == "win32" else ["-O3"],
            optional=True,
        )
    ]
)

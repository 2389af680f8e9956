# Everything but the C extension is declared in setup.cfg (setuptools reads
# ext_modules from code only).
from setuptools import Extension, setup

setup(ext_modules=[Extension("dkr.unpack._tarcore", ["dkr/unpack/_tarcore.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra"])])

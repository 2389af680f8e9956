"""``dkr demo``: a local registry, a small generated image, and a pull of it.

Shows the whole path on one machine with nothing from the internet: Debian's
``docker-registry`` on a loopback port, a sample image pushed through its
HTTP API, then an ordinary ``dkr pull`` into an image root.
"""

from __future__ import annotations

import logging
import os
import time

from dkr import api
from dkr.cli.render import log_renderer
from dkr.errors import DkrError
from dkr.events import Events
from dkr.registry.v2 import host_platform

log = logging.getLogger("dkr")


def run_demo(image_root, backend: str = "auto") -> int:
    try:
        from dkr.testing import images
        from dkr.testing.registry import Registry, RegistryError
    except ImportError as e:   # pragma: no cover - shipped with the package
        raise DkrError(f"demo support is missing: {e}") from None
    try:
        registry = Registry()           # (started by its constructor)
    except (RegistryError, OSError) as e:
        raise DkrError(f"cannot start a local registry (is docker-registry installed?): {e}") from None
    try:
        host = host_platform()            # the sample is made for this machine
        sample = images.sample_image(arch=host.architecture, variant=host.variant)
        digest = images.push_image(registry, "demo/sample", "latest", sample)
        log.info("Started a registry at %s with demo/sample:latest (%s).", registry.host, digest)
        reference = f"{registry.host}/demo/sample:latest"
        options = api.PullOptions(image_root=image_root, backend=backend, force=True, insecure=True)
        started = time.monotonic()
        result = api.pull(reference, "sample", options=options, events=Events([log_renderer]))
        machine = os.path.join(image_root, result.local)
        log.info("Done in %.2f s. The machine is %s:", time.monotonic() - started, machine)
        for name in sorted(os.listdir(machine)):
            log.info("  /%s", name)
        log.info("See it with: dkr list --image-root %s; dkr inspect --image-root %s %s",
                 image_root, image_root, result.local)
        log.info("(A real image with a shell boots with: systemd-nspawn -D %s)", machine)
    finally:
        registry.stop()
    return 0

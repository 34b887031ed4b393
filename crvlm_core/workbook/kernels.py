"""The Jupyter kernel the workbook runs in: this interpreter's own kernel registered inside its environment for
headless runs (:func:`venv_kernel`), and the per-user ``crvlm`` kernel JupyterLab uses (:func:`ensure_kernel`)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from crvlm_core.workbook.params import WorkbookError

__all__ = ["DEFAULT_KERNEL", "ensure_kernel", "resolve_kernel", "venv_kernel"]

DEFAULT_KERNEL = "crvlm"


def _say(msg: str) -> None:
    print(f"[workbook] {msg}", flush=True)


def _same_interpreter(a: str, b: str) -> bool:
    """Whether two interpreter paths belong to the same environment (venv pythons are symlinks into a shared
    base install, so compare their ``bin`` folders, not the resolved executables)."""
    try:
        return Path(a).parent.resolve() == Path(b).parent.resolve()
    except OSError:
        return False


def venv_kernel() -> str:
    """The kernel a headless run of the default kernel uses: this interpreter's own, registered inside its
    environment (``<sys.prefix>/share/jupyter/kernels/crvlm-<hash of sys.prefix>``) on first use.

    The per-user ``crvlm`` kernel (for JupyterLab) is one name shared by every checkout on the machine: a run that
    re-pointed it at its own venv made the notebooks of another checkout's run, started later, execute in that venv.
    A name of its own per environment cannot be taken over, and Jupyter finds it from this interpreter.

    Raises:
        WorkbookError: ipykernel could not register it (the message says to run ``make setup``).
    """
    name = f"{DEFAULT_KERNEL}-{hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]}"
    spec = Path(sys.prefix) / "share" / "jupyter" / "kernels" / name / "kernel.json"
    try:
        argv = json.loads(spec.read_text()).get("argv") or [""]
    except (OSError, ValueError, AttributeError):
        argv = [""]
    if not _same_interpreter(argv[0], sys.executable):
        error = _install_kernel(name, "--sys-prefix", "crvlm (.venv, headless runs)")
        if error is not None or not spec.exists():
            raise WorkbookError(f"could not register the Jupyter kernel {name!r} in {sys.prefix} "
                                f"({error or 'not found after registering'}); run `make setup`")
    return name


def _install_kernel(name: str, where: str, display_name: str) -> str | None:
    """Register this interpreter as the Jupyter kernel ``name`` (``where``: ``--user`` or ``--sys-prefix``).

    Returns:
        None, or the last line of ipykernel's error.
    """
    proc = subprocess.run([sys.executable, "-m", "ipykernel", "install", where, "--name", name,
                           "--display-name", display_name], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    return ((proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""])[0]


def ensure_kernel(kernel: str = DEFAULT_KERNEL) -> str:
    """Make sure the Jupyter kernel ``kernel`` is registered; register ``crvlm`` for this interpreter if missing.

    Returns:
        The kernel's resource folder.

    Raises:
        WorkbookError: The kernel is not registered and could not be (the message says to run ``make setup``).
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(kernel)
        # The default kernel must run this interpreter: with two checkouts (or a CI clone) the per-user kernel
        # may point at another venv, or at one that no longer exists.
        if kernel != DEFAULT_KERNEL or _same_interpreter(spec.argv[0] if spec.argv else "", sys.executable):
            return spec.resource_dir
        _say(f"Jupyter kernel {kernel!r} points at {spec.argv[0]}: re-registering it for {sys.executable}")
    except NoSuchKernel:
        if kernel == DEFAULT_KERNEL:
            _say(f"Jupyter kernel {kernel!r} is not registered: registering it for {sys.executable}")
    if kernel == DEFAULT_KERNEL:
        error = _install_kernel(kernel, "--user", "crvlm (.venv)")
        if error is None:
            try:
                return KernelSpecManager().get_kernel_spec(kernel).resource_dir
            except NoSuchKernel:
                pass
        raise WorkbookError(f"could not register the Jupyter kernel {kernel!r} "
                            f"({error or 'not found after registering'}); run `make setup`")
    raise WorkbookError(f"no Jupyter kernel named {kernel!r}; list them with `jupyter kernelspec list`, "
                        f"or run `make setup` and use the default kernel {DEFAULT_KERNEL!r}")


def resolve_kernel(kernel: str = DEFAULT_KERNEL) -> str:
    """The kernel name a run uses: this environment's own for the default ``crvlm`` (:func:`venv_kernel`), else
    ``kernel`` itself once it is known to be registered (:func:`ensure_kernel`)."""
    if kernel == DEFAULT_KERNEL:
        return venv_kernel()
    ensure_kernel(kernel)
    return kernel

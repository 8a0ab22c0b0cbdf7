"""Container runtimes in a Slurm job: the shell fragment that pulls (once) and runs the image.

:func:`container_command` renders the ``command`` block of the sbatch script for one of
:data:`RUNTIMES`. The fragment is plain POSIX sh plus ``flock``; every value is ``shlex.quote``d,
the only unquoted words are the fragment's own variables (``"$sf_img"``...).

Cluster-side caching, keyed by the manifest digest (``image@sha256:...`` is the only form a job
accepts, so the digest names the content exactly):

* docker, podman: the engine's own image store; ``image inspect``/``image exists`` first, pull only
  when the digest is missing (podman under a ``flock`` so concurrent array tasks pull once).
* podman-hpc: pulled, then migrated by podman-hpc itself to a squashfs in ``<cache_dir>/podman-hpc``
  (its squash dir, shared by the nodes), under one ``flock``; present once it is listed there.
* charliecloud, apptainer/singularity, enroot/pyxis: the converted image lives in
  ``<cache_dir>/<runtime>/sha256-<hex>`` (a directory, ``.sif`` or ``.sqsh``). The conversion runs
  under ``flock`` on a ``.lock`` file beside it, into a temporary name that is renamed into place
  only when complete, so an interrupted pull never leaves a half image that later jobs would trust.

Registry credentials never appear in the fragment: ``auth_dir`` names a mode-700 folder on the
cluster holding the mode-600 files of :func:`registry_auth_files`, read by the runtime itself or
loaded into the environment of the pull's subshell only (the training process never sees them).
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from slurmflow.images import ImageRef, parse_image_ref
from slurmflow.sbatch import ENV_NAME_RE

RUNTIMES: tuple[str, ...] = (
    "docker",
    "podman",
    "podman-hpc",
    "charliecloud",
    "apptainer",
    "singularity",
    "enroot",
    "none",
)
#: Other names users type for a runtime we have.
ALIASES: Mapping[str, str] = {"pyxis": "enroot", "ch-run": "charliecloud", "podman_hpc": "podman-hpc"}

#: Where converted images live when ``cache_dir`` is not given; a site sets the variable to scratch.
DEFAULT_CACHE_DIR = "${SLURMFLOW_IMAGE_CACHE:-$HOME/.cache/slurmflow/images}"
AUTH_DIR_MODE, AUTH_FILE_MODE = 0o700, 0o600
#: File names inside ``auth_dir`` (see :func:`registry_auth_files`).
DOCKER_CONFIG_FILE, REGISTRY_ENV_FILE, ENROOT_CREDENTIALS_FILE = "config.json", "registry.env", ".credentials"

#: Slurm's job and task variables, handed by name to docker/podman containers (the HPC runtimes
#: pass the whole environment): array trials read SLURM_ARRAY_TASK_ID, Lightning's
#: SLURMEnvironment reads the task layout, training reads SLURM_RESTART_COUNT. Unset ones stay
#: unset. Not CUDA_VISIBLE_DEVICES: inside the container the GPUs are renumbered from 0.
SLURM_ENV: tuple[str, ...] = (
    "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT", "SLURM_CLUSTER_NAME",
    "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURMD_NODENAME",
    "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_CPUS_PER_TASK",
    "SLURM_CPUS_ON_NODE", "SLURM_GPUS_ON_NODE", "SLURM_MEM_PER_NODE", "SLURM_PROCID", "SLURM_LOCALID",
    "SLURM_NODEID", "SLURM_STEP_ID", "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_NODES", "SLURM_STEP_NUM_TASKS",
    "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX", "SLURM_RESTART_COUNT", "SLURM_SUBMIT_DIR",
)  # fmt: skip

# Characters that break bind syntax (``src:dst:ro``, pyxis' comma list) or the script itself.
_BAD_PATH_CHARS = re.compile(r"[:,\n\r\0]")


class Raw(str):
    """A shell word that is already safe (our own ``"$var"`` expansions); never quoted again."""


def _q(word: str) -> str:
    return word if isinstance(word, Raw) else shlex.quote(word)


def _join(words: Sequence[str]) -> str:
    return " ".join(_q(w) for w in words)


def _cat(*parts: str) -> Raw:
    """One shell word from pieces: :class:`Raw` pieces as they are, runs of the others quoted."""
    out: list[str] = []
    plain = ""
    for part in parts:
        if isinstance(part, Raw):
            out += [shlex.quote(plain)] if plain else []
            out.append(part)
            plain = ""
        else:
            plain += part
    out += [shlex.quote(plain)] if plain else []
    return Raw("".join(out))


# A path may start with a variable the job script exports (``$SLURMFLOW_JOB_DIR/data``): the job
# directory is only known when the Slurm layer renders the script.
_VAR_PATH_RE = re.compile(r"^\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))(/.*)?$")


def _pieces(path: str) -> list[str]:
    """A path as :func:`_cat` pieces: the literal path, or ``"${VAR}"`` plus the literal rest."""
    m = _VAR_PATH_RE.match(path)
    if not m:
        return [path]
    return [Raw(f'"${{{m.group(1) or m.group(2)}}}"'), m.group(3) or ""]


def _pw(path: str) -> Raw:
    """A path as one shell word."""
    return _cat(*_pieces(path))


@dataclass(frozen=True)
class Bind:
    """A host path made visible in the container.

    :param src: absolute host path, or one starting with a job variable (``$SLURMFLOW_JOB_DIR``).
    :param dst: container path, same forms (default: same as ``src``, the HPC convention).
    :param readonly: mount read-only.
    """

    src: str
    dst: str | None = None
    readonly: bool = False

    def __post_init__(self) -> None:
        for path in (self.src, self.target):
            _check_path(path, "bind path")

    @property
    def target(self) -> str:
        return self.dst or self.src

    @classmethod
    def parse(cls, spec: str | Bind) -> Bind:
        """Parse ``src[:dst][:ro|rw]``."""
        if isinstance(spec, Bind):
            return spec
        parts = spec.split(":")
        readonly = False
        if len(parts) > 1 and parts[-1] in ("ro", "rw"):
            readonly = parts.pop() == "ro"
        if len(parts) > 2:
            raise ValueError(f"bind {spec!r}: expected src[:dst][:ro|rw]")
        return cls(parts[0], parts[1] if len(parts) == 2 else None, readonly)


def _check_path(path: str | None, what: str) -> None:
    if path is None:
        return
    m = _VAR_PATH_RE.match(path)
    literal = (m.group(3) or "") if m else path
    if (not m and not PurePosixPath(path).is_absolute()) or _BAD_PATH_CHARS.search(literal):
        raise ValueError(f"{what} {path!r} must be absolute (or $VAR[/...]) and free of ':' ',' and newlines")


@dataclass(frozen=True)
class ContainerSpec:
    """Everything a runtime needs to run one command in one image.

    :param image_ref: ``registry/repo@sha256:...``; for runtime ``none``, the prefix of a Python
        environment on the cluster (venv or conda; its ``bin`` goes first on PATH) or None.
    :param command: argv of the command run inside the container.
    :param gpus: give the container the GPUs Slurm allocated to the job.
    :param binds: host paths to mount (:class:`Bind` or ``"src[:dst][:ro]"``).
    :param env: non-secret variables for the container (they appear in the script).
    :param pass_env: names of variables already exported in the job (the sbatch template's
        job-dir variables, the secrets it sourced: ``slurmflow.secrets.JOB_SECRET_NAMES``) to
        hand to the container by name: their values stay out of the script and argv
        (docker/podman ``-e NAME``; the HPC runtimes pass the job environment through anyway,
        enroot is told to let them win over the image's values).
    :param env_file: cluster path of a mode-600 ``KEY=VALUE`` file loaded into the container's
        environment, for values the job's shell does not export (never secrets in ``env``).
    :param auth_dir: cluster path of the mode-700 folder holding :func:`registry_auth_files`.
    :param workdir: working directory inside the container.
    :param cache_dir: cluster folder for converted images, shared by jobs (and nodes, if on a
        shared file system); default :data:`DEFAULT_CACHE_DIR`.
    :param insecure_registry: the registry speaks plain HTTP or has an untrusted certificate.
    :param run_args: extra site flags for the run command (e.g. podman's ``--runtime runc``).
    :param launcher: prefix of the run command, e.g. ``("srun", "--kill-on-bad-exit=1")``;
        for enroot it must be srun (pyxis is an srun plugin) and defaults to it.
    :param lock_timeout: seconds a job waits for another job converting the same image.
    """

    image_ref: str | None
    command: tuple[str, ...]
    gpus: bool = False
    binds: tuple[Bind, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    pass_env: tuple[str, ...] = ()
    env_file: str | None = None
    auth_dir: str | None = None
    workdir: str | None = None
    cache_dir: str | None = None
    insecure_registry: bool = False
    run_args: tuple[str, ...] = ()
    launcher: tuple[str, ...] = ()
    lock_timeout: int = 3600

    def __post_init__(self) -> None:
        object.__setattr__(self, "command", tuple(self.command))
        object.__setattr__(self, "binds", tuple(Bind.parse(b) for b in self.binds))
        object.__setattr__(self, "env", dict(self.env))
        object.__setattr__(self, "pass_env", tuple(self.pass_env))
        object.__setattr__(self, "run_args", tuple(self.run_args))
        object.__setattr__(self, "launcher", tuple(self.launcher))
        if not self.command or not all(isinstance(a, str) for a in self.command):
            raise ValueError("command must be a non-empty list of strings")
        for name in (*self.env, *self.pass_env):
            if not ENV_NAME_RE.match(name):
                raise ValueError(f"invalid environment variable name {name!r}")
        for path, what in (
            (self.env_file, "env_file"),
            (self.auth_dir, "auth_dir"),
            (self.workdir, "workdir"),
            (self.cache_dir, "cache_dir"),
        ):
            _check_path(path, what)
        if self.env_file and "=" in self.env_file:
            raise ValueError("env_file path must not contain '=' (ch-run reads it as VAR=VALUE)")
        if self.lock_timeout <= 0:
            raise ValueError("lock_timeout must be positive")

    def pinned_image(self) -> ImageRef:
        """The parsed image reference; it must carry a digest (jobs never run a moving tag)."""
        if not self.image_ref:
            raise ValueError("image_ref is required for a container runtime")
        ref = parse_image_ref(self.image_ref)
        if not ref.digest:
            raise ValueError(f"image {self.image_ref!r} is not pinned: use image@sha256:<digest>")
        return ref


def resolve_runtime(runtime: str) -> str:
    """Canonical runtime name; unknown names are rejected with the list of valid ones."""
    name = ALIASES.get(runtime, runtime)
    if name not in RUNTIMES:
        valid = ", ".join(sorted({*RUNTIMES, *ALIASES}))
        raise ValueError(f"unknown container runtime {runtime!r}; valid: {valid}")
    return name


def container_command(
    runtime: str,
    image_ref: str | None,
    command: Sequence[str],
    *,
    gpus: bool = False,
    binds: Sequence[Bind | str] = (),
    env: Mapping[str, str] | None = None,
    pass_env: Sequence[str] = (),
    env_file: str | None = None,
    auth_dir: str | None = None,
    workdir: str | None = None,
    cache_dir: str | None = None,
    insecure_registry: bool = False,
    run_args: Sequence[str] = (),
    launcher: Sequence[str] = (),
    lock_timeout: int = 3600,
) -> str:
    """Render the sbatch ``command`` block running ``command`` in ``image_ref`` with ``runtime``.

    The fragment prepares the image (pull/convert once per digest, see the module docstring),
    then runs the command as its last statement, so the fragment's exit status is the command's.
    A failed preparation exits the job script with status 1.

    :param runtime: one of :data:`RUNTIMES` (or an alias in :data:`ALIASES`).
    :param image_ref: see :class:`ContainerSpec`; the other parameters are its fields.
    :returns: a multi-line shell fragment, every value quoted.
    """
    spec = ContainerSpec(
        image_ref=image_ref,
        command=tuple(command),
        gpus=bool(gpus),
        binds=tuple(Bind.parse(b) for b in binds),
        env=dict(env or {}),
        pass_env=tuple(pass_env),
        env_file=env_file,
        auth_dir=auth_dir,
        workdir=workdir,
        cache_dir=cache_dir,
        insecure_registry=insecure_registry,
        run_args=tuple(run_args),
        launcher=tuple(launcher),
        lock_timeout=lock_timeout,
    )
    return render(runtime, spec)


def render(runtime: str, spec: ContainerSpec) -> str:
    """Render ``spec`` for ``runtime`` (see :func:`container_command`)."""
    name = resolve_runtime(runtime)
    return "\n".join(_RENDERERS[name](spec)) + "\n"


def registry_auth_files(registry: str, username: str, password: str) -> dict[str, str]:
    """Contents of the files to stage (mode 600, folder mode 700) as a job's ``auth_dir``.

    * ``config.json``: Docker/Podman auth file (``docker --config``, ``--authfile``);
    * ``registry.env``: ``KEY=VALUE`` for ch-image and apptainer/singularity's docker:// pulls;
    * ``.credentials``: netrc for enroot (``ENROOT_CONFIG_PATH``).

    :param registry: ``host[:port]`` as in image references.
    :raises ValueError: for values these formats cannot carry (the message never includes them).
    """
    if not username or not password:
        raise ValueError("registry username and password are required")
    for value in (username, password):
        if any(c in value for c in "\n\r\0") or value != value.strip():
            raise ValueError("registry credentials must not contain newlines or surrounding spaces")
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    files = {
        DOCKER_CONFIG_FILE: json.dumps({"auths": {registry: {"auth": token}}}, indent=2) + "\n",
        REGISTRY_ENV_FILE: "".join(
            f"{k}={v}\n"
            for k, v in (
                ("CH_IMAGE_AUTH", "yes"),
                ("CH_IMAGE_USERNAME", username),
                ("CH_IMAGE_PASSWORD", password),
                ("APPTAINER_DOCKER_USERNAME", username),
                ("APPTAINER_DOCKER_PASSWORD", password),
                ("SINGULARITY_DOCKER_USERNAME", username),
                ("SINGULARITY_DOCKER_PASSWORD", password),
            )
        ),
    }
    # netrc has no quoting and enroot expands a password starting with "$": skip what it cannot hold.
    if not any(c.isspace() for c in username + password) and not password.startswith("$"):
        host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry
        files[ENROOT_CREDENTIALS_FILE] = f"machine {host} login {username} password {password}\n"
    return files


def env_file_text(env: Mapping[str, str]) -> str:
    """Render ``env`` as the ``env_file`` every runtime reads the same way: ``KEY=VALUE`` lines.

    Values are literal (docker/podman ``--env-file``, ``ch-run --env-no-expand --set-env=FILE`` and
    the fragment's own loader never interpret them), so they may not hold newlines; a value wrapped
    in single quotes would lose them in ch-run, so that is refused too.

    :raises ValueError: naming the variable, never its value.
    """
    lines = []
    for name, value in env.items():
        if not ENV_NAME_RE.match(name):
            raise ValueError(f"invalid environment variable name {name!r}")
        if any(c in value for c in "\n\r\0") or (len(value) > 1 and value[0] == value[-1] == "'"):
            raise ValueError(f"value of {name} cannot be carried by an env file (newline or quotes)")
        lines.append(f"{name}={value}\n")
    return "".join(lines)


# --- rendering -------------------------------------------------------------------------------
# Each renderer returns lines. Shared variables: sf_image (pinned ref), sf_cache (cache root),
# sf_img (the prepared image for this job), sf_tmp (a conversion in progress).

_LOAD_ENV = (
    "sf_load_env() {  # export the KEY=VALUE lines of a file; the shell never parses the values",
    '  while IFS= read -r sf_kv || [ -n "$sf_kv" ]; do',
    "    case ${sf_kv%%=*} in ''|[0-9]*|*[!A-Za-z0-9_]*) continue ;; esac",
    '    case $sf_kv in *=*) export "$sf_kv" ;; esac',
    '  done < "$1"',
    "}",
)


def _prologue(runtime: str, spec: ContainerSpec, ref: ImageRef, *, cache: bool, load_env: bool) -> list[str]:
    lines = [f"# slurmflow: {runtime} runs {ref.pinned()}", f"sf_image={shlex.quote(ref.pinned())}"]
    if cache:
        root = _pw(spec.cache_dir.rstrip("/")) if spec.cache_dir else f'"{DEFAULT_CACHE_DIR}"'
        lines.append(f"sf_cache={root}")
    if load_env:
        lines.extend(_LOAD_ENV)
    return lines


def _cache_key(ref: ImageRef) -> str:
    # "sha256-<hex>": a file name without ':' (bind and pyxis syntax split on it).
    return (ref.digest or "").replace(":", "-")


def _auth_path(spec: ContainerSpec, name: str) -> Raw:
    return _cat(*_pieces(spec.auth_dir.rstrip("/")), f"/{name}") if spec.auth_dir else Raw("")


def _cached(
    spec: ContainerSpec, kind: str, path: str, produce: Sequence[str], cleanup: Sequence[str] = ()
) -> list[str]:
    """Lines making ``$sf_img`` (= ``path``) exist once per digest: flock, build to a temp name, rename.

    ``produce`` runs in a subshell (so credentials loaded there die with it) and must create
    ``"$sf_tmp"``; ``cleanup`` runs after it, success or not.
    """
    return [
        f"sf_img={path}",
        'if [ ! -e "$sf_img" ]; then',
        f'  mkdir -p "$sf_cache/{kind}" || exit 1',
        "  (",
        f"    flock -w {int(spec.lock_timeout)} 9 || "
        '{ echo "slurmflow: timed out waiting for $sf_img.lock" >&2; exit 1; }',
        '    [ -e "$sf_img" ] && exit 0  # another job finished it while we waited',
        f'    echo "slurmflow: preparing $sf_image for {kind} (once per digest)" >&2',
        '    sf_tmp="$sf_img.tmp.$$"',
        '    rm -rf "$sf_tmp"',
        "    if (",
        *(f"      {line}" for line in produce),
        "    ); then sf_rc=0; else sf_rc=1; fi",
        *(f"    {line}" for line in cleanup),
        '    if [ "$sf_rc" -ne 0 ]; then rm -rf "$sf_tmp"; exit 1; fi',
        '    mv -f "$sf_tmp" "$sf_img"',
        '  ) 9>"$sf_img.lock" || exit 1',
        "fi",
    ]


def _engine_pull(
    spec: ContainerSpec, exists: str, pull: str, *, lock_kind: str | None, ref: ImageRef
) -> list[str]:
    """Pull into an engine's own store when the digest is missing (optionally under flock)."""
    if lock_kind is None:
        return [
            f"if ! {exists} >/dev/null 2>&1; then",
            '  echo "slurmflow: pulling $sf_image" >&2',
            f"  {pull} >/dev/null || exit 1",
            "fi",
        ]
    return [
        f"if ! {exists} >/dev/null 2>&1; then",
        f'  mkdir -p "$sf_cache/{lock_kind}" || exit 1',
        "  (",
        f"    flock -w {int(spec.lock_timeout)} 9 || "
        '{ echo "slurmflow: timed out waiting for the image lock" >&2; exit 1; }',
        f"    {exists} >/dev/null 2>&1 && exit 0",
        '    echo "slurmflow: pulling $sf_image" >&2',
        f"    {pull} >/dev/null",
        f'  ) 9>"$sf_cache/{lock_kind}/{_cache_key(ref)}.lock" || exit 1',
        "fi",
    ]


def _bind_spec(b: Bind, *, readonly: bool = True) -> list[str]:
    """``src:dst[:ro]`` as word pieces (for :func:`_cat`)."""
    return [*_pieces(b.src), ":", *_pieces(b.target), ":ro" if readonly and b.readonly else ""]


def _engine_run_flags(spec: ContainerSpec) -> list[str]:
    """Flags docker, podman and podman-hpc share: mounts, workdir, environment."""
    words: list[str] = []
    for b in spec.binds:
        words += ["-v", _cat(*_bind_spec(b))]
    if spec.workdir:
        words += ["-w", _pw(spec.workdir)]
    if spec.env_file:
        words += ["--env-file", _pw(spec.env_file)]
    for name in dict.fromkeys([*SLURM_ENV, *spec.pass_env]):
        words += ["-e", name]  # value read from the client's environment, not from argv
    for name, value in spec.env.items():
        words += ["-e", f"{name}={value}"]
    return words


def _run_line(spec: ContainerSpec, words: Sequence[str]) -> str:
    return _join([*spec.launcher, *words])


def _command_tail(spec: ContainerSpec, image_word: str) -> list[str]:
    return [*spec.run_args, Raw(image_word), *spec.command]


def _render_docker(spec: ContainerSpec) -> list[str]:
    ref = spec.pinned_image()
    lines = _prologue("docker", spec, ref, cache=False, load_env=False)
    docker = ["docker", "--config", _pw(spec.auth_dir)] if spec.auth_dir else ["docker"]
    lines += _engine_pull(
        spec,
        'docker image inspect "$sf_image"',
        _join(docker) + ' pull -q "$sf_image"',
        lock_kind=None,
        ref=ref,
    )
    # The daemon is outside the job's cgroup: name the GPUs Slurm gave us, or it would hand out any.
    words = [
        "docker",
        "run",
        "--rm",
        "--init",
        "--network",
        "host",
        "--ipc",
        "host",
        "--user",
        Raw('"$(id -u):$(id -g)"'),
        "--label",
        Raw('"slurmflow.slurm_job_id=${SLURM_JOB_ID:-none}"'),
    ]
    if spec.gpus:
        lines += [
            "sf_gpus=all",
            'if [ -n "${SLURM_JOB_GPUS:-}" ]; then sf_gpus="\\"device=$SLURM_JOB_GPUS\\""; fi',
        ]
        words += ["--gpus", Raw('"$sf_gpus"')]
    if "HOME" not in spec.env:
        words += ["-e", "HOME=/tmp"]  # the job's uid has no home in the image
    words += _engine_run_flags(spec) + _command_tail(spec, '"$sf_image"')
    return [*lines, _run_line(spec, words)]


def _registry_pull(spec: ContainerSpec, binary: Sequence[str]) -> str:
    """``podman[-hpc] pull`` of ``$sf_image`` with exactly the staged credentials (if any)."""
    pull = [*binary, "pull", "-q"]
    if spec.insecure_registry:
        pull.append("--tls-verify=false")
    if spec.auth_dir:
        # --authfile alone still falls back to ~/.docker/config.json: point DOCKER_CONFIG at the
        # staged folder too, so the pull uses exactly the credentials the job was given.
        pull = [
            _cat("DOCKER_CONFIG=", *_pieces(spec.auth_dir)),
            *pull,
            "--authfile",
            _auth_path(spec, DOCKER_CONFIG_FILE),
        ]
    return _join(pull) + ' "$sf_image"'


def _podman_user_flags() -> list[str]:
    # keep-id + --user: the job's uid inside too (the image's USER would win otherwise), so
    # files written to bind mounts belong to the job's user. No --ipc host (it needs the
    # host's /dev/mqueue, absent in some sandboxes): a larger /dev/shm instead, since the
    # 64 MB default kills DataLoader workers.
    return [
        "--network",
        "host",
        "--userns",
        "keep-id",
        "--user",
        Raw('"$(id -u):$(id -g)"'),
        "--shm-size",
        "1g",
    ]


def _render_podman(spec: ContainerSpec) -> list[str]:
    ref = spec.pinned_image()
    lines = _prologue("podman", spec, ref, cache=True, load_env=False)
    lines += _engine_pull(
        spec, 'podman image exists "$sf_image"', _registry_pull(spec, ["podman"]), lock_kind="podman", ref=ref
    )
    words = ["podman", "run", "--rm", *_podman_user_flags()]
    if spec.gpus:
        words += ["--device", "nvidia.com/gpu=all"]
    if "HOME" not in spec.env:
        words += ["-e", "HOME=/tmp"]
    words += _engine_run_flags(spec) + _command_tail(spec, '"$sf_image"')
    return [*lines, _run_line(spec, words)]


def _render_podman_hpc(spec: ContainerSpec) -> list[str]:
    """podman-hpc (NERSC): ``pull`` fetches into the node-local store and *migrates* the image to
    a squashfs in the squash dir (``<cache_dir>/podman-hpc``, on the shared file system), which
    ``run`` mounts on every node. The digest counts as present only once it is in the squash dir
    (``images`` lists that store read-only; ``image exists`` does not look there), and podman-hpc's
    pull exits 0 even when the migration failed, so the fragment checks again after it. One lock
    for the whole squash dir: podman-hpc rewrites its image list without a lock of its own.
    """
    ref = spec.pinned_image()
    lines = _prologue("podman-hpc", spec, ref, cache=True, load_env=False)
    hpc = ["podman-hpc", "--squash-dir", Raw('"$sf_sqdir"')]
    lines += [
        'sf_sqdir="$sf_cache/podman-hpc"',
        "sf_migrated() {  # the digest is in the squash dir",
        f"  {_join([*hpc, 'images', '--no-trunc', '--filter', 'readonly=true', '--format'])} "
        + "'{{.Repository}}@{{.Digest}}' 2>/dev/null | grep -qxF \"$sf_image\"",
        "}",
        "if ! sf_migrated; then",
        '  mkdir -p "$sf_sqdir" || exit 1',
        "  (",
        f"    flock -w {int(spec.lock_timeout)} 9 || "
        '{ echo "slurmflow: timed out waiting for the image lock" >&2; exit 1; }',
        "    sf_migrated && exit 0  # another job migrated it while we waited",
        '    echo "slurmflow: pulling $sf_image and migrating it to $sf_sqdir (once per digest)" >&2',
        f"    {_registry_pull(spec, hpc)} >/dev/null || exit 1",
        '    sf_migrated || { echo "slurmflow: podman-hpc did not migrate $sf_image to $sf_sqdir" >&2; exit 1; }',
        "    # the node-local copy is not needed: every job runs the squashed image",
        f'    {_join(hpc)} rmi "$sf_image" >/dev/null 2>&1 || true',
        '  ) 9>"$sf_sqdir/.slurmflow.lock" || exit 1',
        "fi",
    ]
    # podman-hpc brings the site's GPU hooks (--gpu); the rest as for podman.
    words = [*hpc, "run", "--rm", *_podman_user_flags()]
    if spec.gpus:
        words.append("--gpu")
    if "HOME" not in spec.env:
        words += ["-e", "HOME=/tmp"]
    words += _engine_run_flags(spec) + _command_tail(spec, '"$sf_image"')
    return [*lines, _run_line(spec, words)]


def _mkdir_in_image(spec: ContainerSpec) -> list[str]:
    # ch-run mounts only onto existing directories of the image: create them (idempotent).
    targets = sorted({b.target for b in spec.binds} | ({spec.workdir} if spec.workdir else set()))
    if not targets:
        return []
    return ["mkdir -p " + " ".join('"$sf_img"' + _pw(t) for t in targets)]


def _render_charliecloud(spec: ContainerSpec) -> list[str]:
    ref = spec.pinned_image()
    lines = _prologue("charliecloud", spec, ref, cache=True, load_env=bool(spec.auth_dir))
    pull = ["ch-image", "pull"]
    if spec.insecure_registry:
        pull.append("--tls-no-verify")
    produce = []
    if spec.auth_dir:
        produce.append(f"sf_load_env {_auth_path(spec, REGISTRY_ENV_FILE)}")
    # A private ch-image storage per conversion: ch-image refuses to share a locked storage.
    produce += [
        'export CH_IMAGE_STORAGE="$sf_tmp.storage"',
        _join(pull) + ' "$sf_image" &&',
        'ch-convert -i ch-image -o dir "$sf_image" "$sf_tmp"',
    ]
    lines += _cached(
        spec,
        "charliecloud",
        f'"$sf_cache/charliecloud/{_cache_key(ref)}"',
        produce,
        cleanup=['rm -rf "$sf_tmp.storage"'],
    )
    if spec.gpus:
        # ch-fromhost copies the node's driver libraries in, so the copy is keyed by driver version.
        lines += ["sf_drv=$(cat /sys/module/nvidia/version 2>/dev/null || echo none)", 'sf_base="$sf_img"']
        lines += _cached(
            spec,
            "charliecloud",
            '"$sf_base.nvidia-$sf_drv"',
            ['cp -a "$sf_base" "$sf_tmp" &&', 'ch-fromhost --nvidia "$sf_tmp"'],
        )
    lines += _mkdir_in_image(spec)
    words = ["ch-run", "--env-no-expand", "--set-env"]  # bare --set-env: the image's ENV (/ch/environment)
    if spec.env_file:
        words.append(_cat("--set-env=", *_pieces(spec.env_file)))
    env = {"HOME": "/tmp", **spec.env}
    words += [f"--set-env={k}={v}" for k, v in env.items()]
    for b in spec.binds:
        words.append(_cat("--bind=", *_bind_spec(b, readonly=False)))  # ch-run has no read-only binds
    if spec.workdir:
        words.append(_cat("--cd=", *_pieces(spec.workdir)))
    words += [*spec.run_args, Raw('"$sf_img"'), "--", *spec.command]
    return [*lines, _run_line(spec, words)]


def _render_apptainer(spec: ContainerSpec, *, binary: str = "apptainer") -> list[str]:
    ref = spec.pinned_image()
    lines = _prologue(binary, spec, ref, cache=True, load_env=bool(spec.auth_dir or spec.env_file))
    pull = [binary, "pull"]
    if spec.insecure_registry:
        pull.append("--no-https" if binary == "apptainer" else "--nohttps")
    produce = [f"sf_load_env {_auth_path(spec, REGISTRY_ENV_FILE)}"] if spec.auth_dir else []
    produce.append(_join(pull) + ' "$sf_tmp" "docker://$sf_image"')
    lines += _cached(spec, binary, f'"$sf_cache/{binary}/{_cache_key(ref)}.sif"', produce)
    words = [binary, "exec"]
    if spec.gpus:
        words.append("--nv")
    for b in spec.binds:
        words += ["--bind", _cat(*_bind_spec(b))]
    if spec.workdir:
        words += ["--pwd", _pw(spec.workdir)]
    words += _command_tail(spec, '"$sf_img"')
    # Apptainer passes the host environment in. Its own --env-file is *shell-parsed* and --env
    # splits on commas, so the env file is loaded literally by sf_load_env and explicit values go
    # through APPTAINERENV_* (which also win over the image's own values).
    prefix = "APPTAINERENV_" if binary == "apptainer" else "SINGULARITYENV_"
    body = [f"sf_load_env {_pw(spec.env_file)}"] if spec.env_file else []
    body += [f"export {prefix}{k}={shlex.quote(v)}" for k, v in spec.env.items()]
    return [*lines, *_subshell(body, [*spec.launcher, *words])]


def _subshell(body: Sequence[str], words: Sequence[str]) -> list[str]:
    """Run ``words`` (exec'd) after ``body`` in a subshell, so its environment stays there."""
    if not body:
        return [_join(words)]
    return ["(", *(f"  {line}" for line in body), f"  exec {_join(words)}", ")"]


def _render_enroot(spec: ContainerSpec) -> list[str]:
    ref = spec.pinned_image()
    launcher = spec.launcher or ("srun",)
    if launcher[0] != "srun":
        raise ValueError("enroot runs through pyxis: launcher must be srun [args...]")
    lines = _prologue("enroot", spec, ref, cache=True, load_env=bool(spec.env_file))
    produce = []
    if spec.auth_dir:
        produce.append(f"export ENROOT_CONFIG_PATH={_pw(spec.auth_dir)}")  # reads .credentials
    if spec.insecure_registry:
        produce.append("export ENROOT_ALLOW_HTTP=yes")
    uri = f"docker://{ref.registry}#{ref.repository}@{ref.digest}"
    produce.append(f'enroot import --output "$sf_tmp" {shlex.quote(uri)}')
    lines += _cached(spec, "enroot", f'"$sf_cache/enroot/{_cache_key(ref)}.sqsh"', produce)
    words = [*launcher, Raw('--container-image="$sf_img"')]
    if spec.binds:
        pieces = [piece for b in spec.binds for piece in (",", *_bind_spec(b))][1:]
        words.append(_cat("--container-mounts=", *pieces))
    if spec.workdir:
        words.append(_cat("--container-workdir=", *_pieces(spec.workdir)))
    if spec.env or spec.pass_env:
        # Without --container-env, a variable the image also sets (HOME, PATH...) keeps the image's value.
        words.append("--container-env=" + ",".join(dict.fromkeys([*spec.pass_env, *spec.env])))
    words += [*spec.run_args, *spec.command]
    body = [f"sf_load_env {_pw(spec.env_file)}"] if spec.env_file else []
    body += [f"export {k}={shlex.quote(v)}" for k, v in spec.env.items()]
    return [*lines, *_subshell(body, words)]


def _render_none(spec: ContainerSpec) -> list[str]:
    if spec.image_ref:
        _check_path(spec.image_ref, "python environment")
    for b in spec.binds:
        if b.target != b.src:
            raise ValueError(f"runtime none cannot mount {b.src} at {b.target}: no container")
    lines = [f"# slurmflow: none runs the command in {spec.image_ref or 'the cluster Python on PATH'}"]
    if spec.env_file:
        lines += _LOAD_ENV
    body = [f"sf_load_env {_pw(spec.env_file)}"] if spec.env_file else []
    body += [f"export {k}={shlex.quote(v)}" for k, v in spec.env.items()]
    if spec.image_ref:
        body.append(f'PATH={shlex.quote(spec.image_ref.rstrip("/") + "/bin")}:"$PATH"; export PATH')
    if spec.workdir:
        body.append(f"cd {_pw(spec.workdir)} || exit 1")
    return [*lines, *_subshell(body, [*spec.launcher, *spec.command])]


_RENDERERS = {
    "docker": _render_docker,
    "podman": _render_podman,
    "podman-hpc": _render_podman_hpc,
    "charliecloud": _render_charliecloud,
    "apptainer": _render_apptainer,
    "singularity": lambda spec: _render_apptainer(spec, binary="singularity"),
    "enroot": _render_enroot,
    "none": _render_none,
}

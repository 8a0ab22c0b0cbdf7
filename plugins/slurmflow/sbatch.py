"""sbatch scripts: validated options, rendered from ``include/sbatch/job.sh.j2``.

Pure module (Jinja only). Every option is checked against a pattern or range before it
reaches the template, unknown options are rejected with the list of valid ones (submitit's
rule), and every value is shell-quoted by the template's ``q`` filter. Secret values never
enter the script, nor this module: the script knows the secrets by name only and sources the
job's mode-600 secrets file, which :mod:`slurmflow.secrets` renders.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from slurmflow.constants import DEFAULT_TEMPLATE  # noqa: F401 (re-exported)
from slurmflow.paths import SECRETS_FILE_NAME, JobPaths, expand_log_path  # noqa: F401 (re-exported)

#: Where the default template (DEFAULT_TEMPLATE, job.sh.j2) lives: <project>/include/sbatch/ (Astro layout).
TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "include" / "sbatch"

#: A shell variable name: the one rule for every variable a job exports or passes on.
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SbatchOptionError(ValueError):
    """An sbatch option is unknown or its value is invalid."""


def _pattern(regex: str, hint: str) -> Callable[[Any], str]:
    compiled = re.compile(regex)

    def check(value: Any) -> str:
        if isinstance(value, bool):
            raise ValueError(f"expected {hint}, got a boolean")
        text = str(value).strip()
        if not compiled.fullmatch(text):
            raise ValueError(f"{text!r} is not {hint}")
        return text

    return check


def _int_range(low: int, high: int) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if isinstance(value, bool) or not re.fullmatch(r"\d+", str(value).strip()):
            raise ValueError(f"{value!r} is not an integer")
        number = int(str(value).strip())
        if not low <= number <= high:
            raise ValueError(f"{number} is outside {low}..{high}")
        return str(number)

    return check


def _path(value: Any) -> str:
    text = str(value)
    if not text or len(text) > 4096:
        raise ValueError("a path must have 1..4096 characters")
    # Control characters (newline above all) would end the #SBATCH line; everything else is
    # quoted, so '$(...)', ';' or spaces stay literal characters of the file name.
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"{text!r} contains control characters")
    if "'" in text or '"' in text or "\\" in text:
        # sbatch's own #SBATCH parser understands plain quoting only (no escapes or quote
        # concatenation), so quote characters could not be represented faithfully.
        raise ValueError(f"{text!r} contains quotes or backslashes")
    return text


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected True or False, got {value!r}")
    return value


_NAME = r"[A-Za-z0-9_.+-]{1,64}"
_TIME = r"(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}|\d+-\d{1,2}:\d{1,2}|\d+-\d{1,2}:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)"
_ARRAY = r"\d+(-\d+(:\d+)?)?(,\d+(-\d+(:\d+)?)?)*(%\d+)?"
_GRES = r"[A-Za-z0-9_]+(:[A-Za-z0-9_.-]+)?(:\d+)?(,[A-Za-z0-9_]+(:[A-Za-z0-9_.-]+)?(:\d+)?)*"
_GPUS = r"([A-Za-z0-9_.-]+:)?\d+"
_MEM = r"\d+[KMGT]?"
_SIGNAL = r"((B|R|RB|BR):)?(SIG)?[A-Z0-9]{1,10}(@\d{1,6})?"
_HOSTLIST = r"[A-Za-z0-9_.\[\],-]+"
_BIND = r"([a-z_]+,)*[a-z_]+(:[0-9A-Fa-fx,]+)?"


@dataclass(frozen=True)
class OptionSpec:
    """One supported sbatch option: its flag, how values are checked, and a description."""

    flag: str
    check: Callable[[Any], Any]
    help: str


#: Supported options. Keys use underscores; dashed spellings (``ntasks-per-node``) also work.
OPTIONS: dict[str, OptionSpec] = {
    "partition": OptionSpec("--partition", _pattern(rf"{_NAME}(,{_NAME})*", "a partition name"), "partition(s)"),
    "account": OptionSpec("--account", _pattern(_NAME, "an account name"), "account to charge"),
    "qos": OptionSpec("--qos", _pattern(_NAME, "a QOS name"), "quality of service"),
    "reservation": OptionSpec("--reservation", _pattern(_NAME, "a reservation name"), "reservation"),
    "nodes": OptionSpec("--nodes", _pattern(r"[1-9]\d{0,4}(-[1-9]\d{0,4})?", "N or MIN-MAX nodes"), "node count"),
    "ntasks": OptionSpec("--ntasks", _int_range(1, 1_000_000), "number of tasks"),
    "ntasks_per_node": OptionSpec("--ntasks-per-node", _int_range(1, 10_000), "tasks per node"),
    "cpus_per_task": OptionSpec("--cpus-per-task", _int_range(1, 10_000), "CPUs per task"),
    "gpus": OptionSpec("--gpus", _pattern(_GPUS, "N or TYPE:N GPUs"), "GPUs for the job"),
    "gpus_per_node": OptionSpec("--gpus-per-node", _pattern(_GPUS, "N or TYPE:N GPUs"), "GPUs per node"),
    "gpus_per_task": OptionSpec("--gpus-per-task", _pattern(_GPUS, "N or TYPE:N GPUs"), "GPUs per task"),
    "gres": OptionSpec("--gres", _pattern(_GRES, "NAME[:TYPE][:N][,...] generic resources"), "generic resources"),
    "mem": OptionSpec("--mem", _pattern(_MEM, "memory such as 4096 or 16G"), "memory per node"),
    "mem_per_cpu": OptionSpec("--mem-per-cpu", _pattern(_MEM, "memory such as 512 or 2G"), "memory per CPU"),
    "mem_per_gpu": OptionSpec("--mem-per-gpu", _pattern(_MEM, "memory such as 16G"), "memory per GPU"),
    "time": OptionSpec("--time", _pattern(_TIME, "a Slurm time limit such as 30, 1:00:00 or 2-00:00:00"), "time limit"),
    "time_min": OptionSpec("--time-min", _pattern(_TIME, "a Slurm time limit"), "minimum time limit"),
    "array": OptionSpec("--array", _pattern(_ARRAY, "an array spec such as 0-9%2 or 1,3,5-7"), "job array with throttle"),
    "signal": OptionSpec("--signal", _pattern(_SIGNAL, "[B:]SIG[@seconds] such as B:USR2@120"), "signal before the time limit"),
    "requeue": OptionSpec("--requeue", _flag, "True: --requeue, False: --no-requeue"),
    "output": OptionSpec("--output", _path, "stdout path (%j, %A, %a allowed)"),
    "error": OptionSpec("--error", _path, "stderr path (default: with stdout)"),
    "chdir": OptionSpec("--chdir", _path, "working directory (default: the job directory)"),
    "open_mode": OptionSpec("--open-mode", _pattern(r"append|truncate", "append or truncate"), "log file open mode"),
    "constraint": OptionSpec("--constraint", _pattern(r"[A-Za-z0-9_&|,*:.\[\]()!-]{1,256}", "a feature expression"), "node features"),
    "exclusive": OptionSpec("--exclusive", _flag, "whole nodes"),
    "nodelist": OptionSpec("--nodelist", _pattern(_HOSTLIST, "a host list"), "nodes to use"),
    "exclude": OptionSpec("--exclude", _pattern(_HOSTLIST, "a host list"), "nodes to avoid"),
    "dependency": OptionSpec("--dependency", _pattern(r"[a-z]+(:[0-9_+:]+)?([,?][a-z]+(:[0-9_+:]+)?)*", "a dependency list"), "job dependencies"),
    "begin": OptionSpec("--begin", _pattern(r"[A-Za-z0-9:+-]{1,40}", "a begin time such as now+60"), "earliest start"),
    "nice": OptionSpec("--nice", _pattern(r"-?\d{1,7}", "an integer"), "scheduling niceness"),
    "hint": OptionSpec("--hint", _pattern(r"[a-z_]+", "a hint such as nomultithread"), "task layout hint"),
    "gpu_bind": OptionSpec("--gpu-bind", _pattern(_BIND, "a binding such as closest or map_gpu:0,1"), "GPU binding"),
    "cpus_per_gpu": OptionSpec("--cpus-per-gpu", _int_range(1, 10_000), "CPUs per GPU"),
    "distribution": OptionSpec("--distribution", _pattern(r"[a-z*]+(:[a-z*]+){0,2}(,[A-Za-z]+)?",
                                                          "a distribution such as block:block"), "task distribution"),
    "wckey": OptionSpec("--wckey", _pattern(_NAME, "a wckey name"), "workload characterization key"),
    "cpu_freq": OptionSpec("--cpu-freq", _pattern(r"[A-Za-z0-9]+(-[A-Za-z0-9]+)?(:[A-Za-z]+)?",
                                                  "a frequency such as 2250000 or High"), "CPU frequency"),
    "licenses": OptionSpec("--licenses", _pattern(r"[A-Za-z0-9_@:,.-]+", "a license list"), "licenses"),
    "tmp": OptionSpec("--tmp", _pattern(_MEM, "disk size such as 10G"), "temporary disk"),
    "mail_type": OptionSpec("--mail-type", _pattern(r"[A-Z_0-9]+(,[A-Z_0-9]+)*", "mail types such as END,FAIL"), "mail events"),
    "mail_user": OptionSpec("--mail-user", _pattern(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+", "an e-mail address"), "mail recipient"),
    "hold": OptionSpec("--hold", _flag, "submit held (release with scontrol release)"),
}


def normalize_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate options and return them normalized (underscore keys, checked values).

    ``None`` values are dropped so callers can pass optional settings through unchanged.

    :raises SbatchOptionError: for unknown options (listing the valid ones) or invalid values.
    """
    result: dict[str, Any] = {}
    for raw_key, value in (options or {}).items():
        key = str(raw_key).strip().lstrip("-").replace("-", "_")
        if key in {"job_name", "comment", "parsable"}:
            raise SbatchOptionError(
                f"sbatch option {raw_key!r} is set by slurmflow (the job name carries the "
                "exactly-once key); it cannot be overridden"
            )
        spec = OPTIONS.get(key)
        if spec is None:
            valid = ", ".join(sorted(OPTIONS))
            raise SbatchOptionError(f"unknown sbatch option {raw_key!r}; valid options: {valid}")
        if value is None:
            continue
        try:
            result[key] = spec.check(value)
        except ValueError as exc:
            raise SbatchOptionError(f"invalid value for sbatch option {key!r}: {exc}") from None
    return result


def validate_environment(env: Mapping[str, Any] | None, what: str = "environment") -> dict[str, str]:
    """Check variable names (shell identifiers) and turn values into strings.

    Values may contain anything but NUL: the template quotes them, so ``$(...)``, backticks,
    ``;`` or newlines stay data.
    """
    result: dict[str, str] = {}
    for name, value in (env or {}).items():
        if not ENV_NAME_RE.fullmatch(str(name)):
            raise SbatchOptionError(f"invalid {what} variable name {name!r}: must match {ENV_NAME_RE.pattern}")
        text = "" if value is None else str(value)
        if "\x00" in text:
            raise SbatchOptionError(f"{what} variable {name!r} contains a NUL byte")
        result[str(name)] = text
    return result


def forwarded_signal(signal_option: str | None) -> str | None:
    """The signal the batch shell must forward to the job's processes (``B:`` signals only)."""
    if not signal_option:
        return None
    scope, sep, rest = signal_option.partition(":")
    if not sep or "B" not in scope:
        return None
    name = rest.split("@", 1)[0]
    return name[3:] if name.startswith("SIG") else name


@dataclass(frozen=True)
class SbatchScript:
    """Everything that defines one job's script, validated.

    :param command: shell fragment the job runs (e.g. the container runtime's command from
        ``slurmflow.runtimes.container_command``); inserted verbatim, so the caller quotes it.
    :param job_name: the key-bearing job name (:meth:`slurmflow.identity.JobKey.job_name`).
    :param job_dir: the per-run job directory on the cluster (absolute path).
    :param options: sbatch options (see :data:`OPTIONS`).
    :param environment: plain environment variables, visible in the script.
    :param secret_names: names of the secret variables the script sources from the job's
        secrets file (:class:`slurmflow.secrets.JobSecrets`); never their values.
    :param comment: ``--comment`` (the human-readable key).
    :param setup: shell lines run before the command (``module load ...``); verbatim.
    """

    command: str
    job_name: str
    job_dir: str
    options: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    secret_names: tuple[str, ...] = ()
    comment: str = ""
    setup: str = ""

    @property
    def is_array(self) -> bool:
        return "array" in self.options

    @property
    def output_pattern(self) -> str:
        """The stdout path pattern (Slurm ``%`` placeholders unexpanded)."""
        default = "slurm-%A_%a.out" if self.is_array else "slurm-%j.out"
        return absolute(self.options.get("output", default), self.workdir)

    @property
    def workdir(self) -> str:
        return absolute(self.options.get("chdir", self.job_dir), self.job_dir)

    @property
    def directories(self) -> list[str]:
        """Directories that must exist before submission (Slurm does not create log directories)."""
        dirs = [self.job_dir, self.workdir]
        for key in ("output", "error"):
            if key in self.options:
                parent = self.options[key].rsplit("/", 1)[0] or "/"
                if "%" not in parent:
                    dirs.append(parent)
        return list(dict.fromkeys(dirs))

    def paths(self, user: str = "") -> JobPaths:
        """Where this job's files live (``user`` fills ``%u`` in the log pattern)."""
        return JobPaths(self.job_dir, self.output_pattern, user=user, job_name=self.job_name)

    @property
    def script_path(self) -> str:
        return self.paths().script

    @property
    def secrets_path(self) -> str | None:
        return self.paths().secrets if self.secret_names else None


def absolute(path: str, base: str) -> str:
    return path if path.startswith("/") else f"{base.rstrip('/')}/{path}"


def build_script(
    *,
    command: str,
    job_name: str,
    job_dir: str,
    options: Mapping[str, Any] | None = None,
    environment: Mapping[str, Any] | None = None,
    secret_names: Sequence[str] = (),
    comment: str = "",
    setup: str = "",
) -> SbatchScript:
    """Validate inputs into an :class:`SbatchScript`.

    :param secret_names: variables of the job's secrets file (``JobSecrets.names``).
    :raises SbatchOptionError: on unknown options, invalid values or variable names.
    """
    if not command or not command.strip():
        raise SbatchOptionError("command is empty: nothing for the job to run")
    if not job_dir.startswith("/"):
        raise SbatchOptionError(f"job_dir must be an absolute path, got {job_dir!r}")
    _path(job_dir)
    env = validate_environment(environment)
    secrets = validate_environment(dict.fromkeys(secret_names, ""), "secret environment")
    both = sorted(set(env) & set(secrets))
    if both:
        raise SbatchOptionError(f"variables both plain and secret: {', '.join(both)}")
    opts = normalize_options(options)
    # Everything absolute: the script means the same whatever directory sbatch runs in, and the
    # log path we stream from is exactly the one Slurm writes.
    opts["chdir"] = absolute(opts.get("chdir", job_dir), job_dir)
    opts["output"] = absolute(opts.get("output", "slurm-%A_%a.out" if "array" in opts else "slurm-%j.out"), opts["chdir"])
    if "error" in opts:
        opts["error"] = absolute(opts["error"], opts["chdir"])
    # Append: a requeued job keeps the output of its earlier runs (Slurm truncates by default).
    opts.setdefault("open_mode", "append")
    return SbatchScript(
        command=command,
        job_name=job_name,
        job_dir=job_dir,
        options=opts,
        environment=env,
        secret_names=tuple(sorted(secrets)),
        comment=comment,
        setup=setup,
    )


@lru_cache(maxsize=8)
def _environment(template_dir: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - a shell script, not HTML; values go through `q`
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    return env


def _directives(script: SbatchScript) -> list[tuple[str, str | None]]:
    """``(flag, value)`` pairs in the OPTIONS order; ``None`` value means a bare flag."""
    pairs: list[tuple[str, str | None]] = []
    for key, spec in OPTIONS.items():
        if key not in script.options:
            continue
        value = script.options[key]
        if key == "requeue":
            pairs.append(("--requeue" if value else "--no-requeue", None))
        elif isinstance(value, bool):
            if value:
                pairs.append((spec.flag, None))
        else:
            pairs.append((spec.flag, value))
    return pairs


def render_script(
    script: SbatchScript,
    *,
    template: str = DEFAULT_TEMPLATE,
    template_dir: str | Path | None = None,
) -> str:
    """Render the sbatch script text.

    :param script: validated inputs (:func:`build_script`).
    :param template: template file name inside ``template_dir``.
    :param template_dir: directory of templates (default ``include/sbatch``).
    """
    env = _environment(str(template_dir or TEMPLATE_DIR))
    return env.get_template(template).render(
        job_name=script.job_name,
        comment=script.comment,
        directives=_directives(script),
        job_dir=script.job_dir,
        workdir=script.workdir,
        environment=sorted(script.environment.items()),
        secrets_path=script.secrets_path,
        forward_signal=forwarded_signal(script.options.get("signal")),
        setup=script.setup.strip(),
        command=script.command.strip(),
    )

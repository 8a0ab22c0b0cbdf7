"""One-time, idempotent set-up of the local stack: folders, users, keys, configs, databases.

Every step checks before it acts, so ``make up`` can run any number of times.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from .config import (
    BASE_IMAGE,
    BASE_IMAGE_REPO,
    BASE_IMAGE_TAG,
    BASE_PACKAGES,
    CLUSTER_HOME,
    CLUSTER_USER,
    PG_PORT,
    REGISTRY,
    REPO,
    SLURM_ACCOUNT,
    SLURM_CONF,
    SSH_KEY,
    STACK,
    VENV_BIN,
    airflow_env,
    load_secrets,
    render,
    stack_executor,
)
from .services import PG_BIN, SLURM_ENV, _http


def _http_ok(url: str) -> bool:
    auth = ("slurmflow", load_secrets()["REGISTRY_PASSWORD"])
    return _http(url, auth=auth) is None


def sh(cmd: list[str], *, input: str | None = None, user: str | None = None, env: dict | None = None,
       check: bool = True) -> subprocess.CompletedProcess:
    """Run a set-up command; secrets go through ``input`` (stdin), never argv."""
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    out = subprocess.run(cmd, input=input, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if check and out.returncode != 0:
        raise SystemExit(f"set-up step failed: {' '.join(cmd[:4])} ...\n{out.stderr.strip() or out.stdout.strip()}")
    return out


def _own(path: Path, user: str, mode: int | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    shutil.chown(path, user, user if user != "postgres" else "postgres")
    if mode is not None:
        os.chmod(path, mode)


def _make_traversable(path: Path) -> None:
    """Let the service users (postgres, munge, the cluster user) reach the stack folder.

    A clone under a mode-700 home would lock them out; o+x (search, not read) on the parents
    is the least that works.
    """
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            print(f"  making {parent} traversable (o+x) for the stack's service users")
            os.chmod(parent, mode | 0o001)


def folders() -> None:
    for sub in ("logs", "run", "etc/slurm", "slurm/ctld", "slurm/d/local1", "slurm/d/local2", "sshd/authorized_keys", "keys",
                "home", "registry/data", "mongo", "mlflow/artifacts", "airflow/logs", "docker", "cache"):
        (STACK / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(STACK, 0o755)
    _make_traversable(STACK)
    _own(Path("/run/munge"), "munge", 0o755)
    _own(STACK / "munge", "munge", 0o700)
    _own(STACK / "run" / "pg", "postgres", 0o755)
    _own(STACK / "pg", "postgres", 0o700)


def cluster_user() -> None:
    """The unprivileged user jobs run as; key-only login (``*`` password: not locked, no login)."""
    try:
        entry = pwd.getpwnam(CLUSTER_USER)
    except KeyError:
        sh(["useradd", "--home-dir", str(CLUSTER_HOME), "--shell", "/bin/bash", "--groups", "docker",
            "--no-create-home", CLUSTER_USER])
        entry = pwd.getpwnam(CLUSTER_USER)
    # usermod refuses while the user has processes: only touch what differs (another clone's home).
    # sshd without PAM refuses a "!"-locked account even for key logins; "*" means no password.
    locked = sh(["getent", "shadow", CLUSTER_USER]).stdout.split(":")[1] != "*"
    if entry.pw_dir != str(CLUSTER_HOME) or locked:
        sh(["usermod", "-p", "*", "--home", str(CLUSTER_HOME), CLUSTER_USER])
    if not CLUSTER_HOME.exists():
        CLUSTER_HOME.mkdir(parents=True)
    shutil.chown(CLUSTER_HOME, CLUSTER_USER, CLUSTER_USER)
    os.chmod(CLUSTER_HOME, 0o755)
    # Rootless podman needs sub-ids; useradd adds them on Debian, but an older user may lack them.
    for f in ("/etc/subuid", "/etc/subgid"):
        if CLUSTER_USER not in Path(f).read_text():
            with open(f, "a") as fh:
                fh.write(f"{CLUSTER_USER}:200000:65536\n")


def keys() -> None:
    if not SSH_KEY.exists():
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "slurmflow-local", "-f", str(SSH_KEY)])
    auth = STACK / "sshd" / "authorized_keys" / CLUSTER_USER
    auth.write_text(Path(f"{SSH_KEY}.pub").read_text())
    os.chmod(auth, 0o644)
    host_key = STACK / "sshd" / "ssh_host_ed25519_key"
    if not host_key.exists():
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)])
    munge_key = STACK / "munge" / "munge.key"
    if not munge_key.exists():
        munge_key.write_bytes(os.urandom(1024))
    shutil.chown(munge_key, "munge", "munge")
    os.chmod(munge_key, 0o400)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder


def configs() -> None:
    render("slurm.conf", SLURM_CONF)
    render("slurmdbd.conf", SLURM_CONF.parent / "slurmdbd.conf", mode=0o600)
    render("sshd_config", STACK / "sshd" / "sshd_config")
    render("registry.yml", STACK / "registry" / "config.yml", mode=0o600)
    render("mlflow_auth.ini", STACK / "mlflow" / "auth.ini", mode=0o600)
    if stack_executor() == "celery":  # the broker runs as the redis user: its folder and config are its own
        _own(STACK / "redis", "redis", 0o700)
        render("redis.conf", STACK / "redis" / "redis.conf", mode=0o600)
        shutil.chown(STACK / "redis" / "redis.conf", "redis", "redis")
    htpasswd = STACK / "registry" / "htpasswd"
    if not htpasswd.exists():  # bcrypt (the registry accepts only bcrypt); password via stdin
        sh(["htpasswd", "-iBc", str(htpasswd), "slurmflow"], input=load_secrets()["REGISTRY_PASSWORD"])
    passwords = STACK / "airflow" / "passwords.json"
    passwords.write_text(json.dumps({"admin": "admin"}))  # dev-only login, see README


def init_databases() -> None:
    """Create the PostgreSQL and MariaDB data folders once (before their daemons start)."""
    if not (STACK / "pg" / "data" / "PG_VERSION").exists():
        sh([f"{PG_BIN}/initdb", "-D", str(STACK / "pg" / "data"), "-U", "postgres", "--auth-local=peer",
            "--auth-host=scram-sha-256", "-E", "UTF8"], user="postgres")
    if not (STACK / "mariadb" / "mysql").exists():
        sh(["mariadb-install-db", "--no-defaults", f"--datadir={STACK / 'mariadb'}", "--user=root",
            "--auth-root-authentication-method=socket", "--skip-test-db"])


def database_users() -> None:
    """Roles and databases for Airflow, MLflow (PostgreSQL) and slurmdbd (MariaDB)."""
    s = load_secrets()
    psql = ["psql", "-h", str(STACK / "run" / "pg"), "-p", str(PG_PORT), "-U", "postgres", "-v", "ON_ERROR_STOP=1",
            "-q", "-d", "postgres"]
    for role, secret in (("airflow", "PG_AIRFLOW_PASSWORD"), ("mlflow", "PG_MLFLOW_PASSWORD")):
        exists = sh([*psql, "-tAc", f"SELECT 1 FROM pg_roles WHERE rolname='{role}'"], user="postgres").stdout
        verb = "ALTER" if exists.strip() else "CREATE"
        sh(psql, user="postgres", input=f"{verb} ROLE {role} LOGIN PASSWORD '{s[secret]}';\n")
        if not sh([*psql, "-tAc", f"SELECT 1 FROM pg_database WHERE datname='{role}'"], user="postgres").stdout.strip():
            sh(psql, user="postgres", input=f"CREATE DATABASE {role} OWNER {role};\n")
    sql = (f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{s['MARIADB_SLURM_PASSWORD']}';\n"
           f"ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{s['MARIADB_SLURM_PASSWORD']}';\n"
           "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';\n")
    sh(["mariadb", f"--socket={STACK / 'run' / 'mysqld.sock'}"], input=sql)


def slurm_accounting() -> None:
    """Cluster, account and user associations (enforced, so a bad --account is refused)."""
    def sacctmgr(*args: str) -> None:
        # "Nothing new added" exits 1: the association is already there.
        sh(["sacctmgr", "-i", *args], env=SLURM_ENV, check=False)

    sacctmgr("add", "cluster", "local")
    sacctmgr("add", "account", SLURM_ACCOUNT, "Description=local research group", "Organization=local")
    for user in (CLUSTER_USER, "root"):
        sacctmgr("add", "user", user, f"Account={SLURM_ACCOUNT}", f"DefaultAccount={SLURM_ACCOUNT}")
    out = sh(["sacctmgr", "-n", "-P", "show", "assoc", f"user={CLUSTER_USER}", "format=account"], env=SLURM_ENV)
    if SLURM_ACCOUNT not in out.stdout:
        raise SystemExit(f"slurm accounting: {CLUSTER_USER} has no association with account {SLURM_ACCOUNT}")


def airflow_db() -> None:
    """Migrate the Airflow metadata DB when the Airflow version changed since the last run."""
    import airflow

    marker = STACK / "airflow" / f".migrated-{airflow.__version__}"
    if not marker.exists():
        sh([str(VENV_BIN / "airflow"), "db", "migrate"], env=airflow_env())
        marker.touch()


DOCKER_CLIENT_CONFIG = STACK / "docker-client"  # root's registry login, kept in the stack folder


def docker(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return sh(["docker", "--config", str(DOCKER_CLIENT_CONFIG), *args], input=input, check=check)


def registry_login() -> None:
    """Log root's client and the cluster user (jobs pull as hpcuser) in to the registry."""
    password = load_secrets()["REGISTRY_PASSWORD"]
    docker("login", "127.0.0.1:5000", "-u", "slurmflow", "--password-stdin", input=password)
    user_cfg = CLUSTER_HOME / ".docker"
    sh(["docker", "--config", str(user_cfg), "login", "127.0.0.1:5000", "-u", "slurmflow", "--password-stdin"],
       input=password)
    sh(["chown", "-R", f"{CLUSTER_USER}:{CLUSTER_USER}", str(user_cfg)])
    os.chmod(user_cfg / "config.json", 0o600)


def base_image() -> None:
    """A Debian bookworm + Python 3.11 base image, made locally: no image hub is reachable."""
    have = docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0
    pushed = _http_ok(f"http://{REGISTRY}/v2/{BASE_IMAGE_REPO}/manifests/{BASE_IMAGE_TAG}")
    if have and pushed:
        return
    if not have:
        tarball = STACK / "cache" / f"base-rootfs-{BASE_IMAGE_TAG}.tar"
        if not tarball.exists():
            rootfs = STACK / "cache" / "base-rootfs"
            shutil.rmtree(rootfs, ignore_errors=True)
            print("  building the base image with debootstrap (first run only, about 2 minutes)")
            sh(["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
                "bookworm", str(rootfs), "http://deb.debian.org/debian"])
            sh(["tar", "-C", str(rootfs), "-cf", str(tarball), "."])
            shutil.rmtree(rootfs)
        docker("import", "--change", 'CMD ["/bin/bash"]', str(tarball), BASE_IMAGE)
    docker("push", "-q", BASE_IMAGE)


def load_airflow_settings() -> None:
    """Load connections, variables and pools from airflow_settings.yaml into Airflow."""
    sh([str(VENV_BIN / "python"), "-m", "scripts.localstack.settings"], env=airflow_env())


def campaign_data() -> None:
    """Demo simulation results in MongoDB for the surrogate task (see campaign.py)."""
    from .campaign import seed

    n = seed()
    if n:
        print(f"  campaign data: {n} documents inserted into campaigns.borehole")


def wheelhouse() -> None:
    """The wheels the training image installs from (no network inside `docker build`)."""
    sh([str(REPO / "scripts" / "wheelhouse.sh")])

#!/usr/bin/python3
"""pg_auto_failover failover and switchover as a client sees it.

Sets up, on this machine and on loopback only, a pg_auto_failover monitor and two
PostgreSQL 15 nodes (Debian packages postgresql-15, postgresql-15-auto-failover,
pg-auto-failover-cli), runs a client that writes one row every 50 ms through a libpq
multi-host connection string with target_session_attrs=read-write, and measures:

  * unplanned failover: kill -9 of the current primary's postmaster (or, with
    --kill node, of the whole node: its pg_autoctl processes and its postmaster),
    from the kill to the end of the first successful write after it;
  * planned switchover: `pg_autoctl perform switchover`, the longest gap between
    two consecutive successful writes around it (the write pause).

Run as root on Debian 12 with Debian's /usr/bin/python3. See README.md beside this file.
"""

import argparse
import json
import math
import os
import platform
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

PG_VERSION = "15"
PG_BIN = f"/usr/lib/postgresql/{PG_VERSION}/bin"
PG_CTL = f"{PG_BIN}/pg_ctl"
PG_AUTOCTL = "/usr/bin/pg_autoctl"
HOST = "127.0.0.1"
PACKAGES = [f"postgresql-{PG_VERSION}", f"postgresql-{PG_VERSION}-auto-failover",
            "pg-auto-failover-cli", "python3-psycopg2"]

# --tuned: the knobs pg_auto_failover's configuration docs name for "deciding when to
# promote the secondary" and "time taken to promote the secondary" (monitor GUCs), and
# the keeper's [timeout] section. network_partition_timeout stays below
# primary_demote_timeout, as the docs require to avoid two primaries.
TUNED_MONITOR = {
    "pgautofailover.health_check_period": "1000",        # default 5000 ms
    "pgautofailover.health_check_timeout": "1000",       # default 5000 ms
    "pgautofailover.health_check_max_retries": "1",      # default 2
    "pgautofailover.health_check_retry_delay": "500",    # default 2000 ms
    "pgautofailover.node_considered_unhealthy_timeout": "5000",  # default 20000 ms
    "pgautofailover.primary_demote_timeout": "10000",    # default 30000 ms
}
TUNED_KEEPER = {
    "timeout.network_partition_timeout": "5",            # default 20 s
    "timeout.postgresql_restart_failure_timeout": "5",   # default 20 s
}

T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:8.2f}] {msg}", file=sys.stderr, flush=True)


def out(msg=""):
    print(msg, flush=True)


class Abort(Exception):
    pass


# --------------------------------------------------------------------------- install

def dpkg_installed(pkg):
    r = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", pkg],
                       capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip() == "installed"


def install_packages():
    missing = [p for p in PACKAGES if not dpkg_installed(p)]
    if not missing:
        log(f"packages already installed: {' '.join(PACKAGES)}")
        return
    if os.geteuid() != 0:
        raise Abort(f"--install needs root (apt-get); missing packages: {' '.join(missing)}")
    log(f"installing with apt-get: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                   check=True, env=env)


# --------------------------------------------------------------------------- helpers

def free_ports(n):
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
            p = s.getsockname()[1]
            if p not in ports:
                ports.append(p)
    finally:
        for s in socks:
            s.close()
    return ports


def percentile(values, q):
    """Nearest-rank percentile: the smallest sample with at least q of the samples at or
    below it. With 20 samples p99 is the 20th, i.e. the maximum."""
    if not values:
        return None
    v = sorted(values)
    return v[max(0, math.ceil(q * len(v)) - 1)]


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def postmaster_pid(pgdata):
    try:
        with open(os.path.join(pgdata, "postmaster.pid")) as f:
            return int(f.readline().strip())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- writer

class Writer(threading.Thread):
    """Writes one row every `interval` s through the multi-host DSN; reconnects on error.
    Records every attempt: (start, end, ok, server_port, error) with monotonic times."""

    def __init__(self, dsn, interval):
        super().__init__(daemon=True, name="writer")
        self.dsn = dsn
        self.interval = interval
        self.samples = []
        self.acked_ids = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.conn = None

    def _close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
        self.conn = None

    def run(self):
        import psycopg2
        next_t = time.monotonic()
        while not self.stop_event.is_set():
            now = time.monotonic()
            if now < next_t:
                self.stop_event.wait(next_t - now)
                if self.stop_event.is_set():
                    break
            t_start = time.monotonic()
            ok, port, err = False, None, None
            try:
                if self.conn is None:
                    self.conn = psycopg2.connect(self.dsn)
                    self.conn.autocommit = True
                with self.conn.cursor() as cur:
                    cur.execute("INSERT INTO failover_bench(port) "
                                "VALUES (inet_server_port()) RETURNING id, port")
                    row_id, port = cur.fetchone()
                ok = True
            except Exception as e:  # psycopg2.Error and anything from a broken socket
                err = " | ".join(l.strip() for l in str(e).strip().splitlines())[:500] \
                    or type(e).__name__
                self._close()
            t_end = time.monotonic()
            with self.lock:
                self.samples.append((t_start, t_end, ok, port, err))
                if ok:
                    self.acked_ids.append(row_id)
            next_t = max(next_t + self.interval, t_end)
        self._close()

    def snapshot(self, since_index=0):
        with self.lock:
            return list(self.samples[since_index:])

    def count(self):
        with self.lock:
            return len(self.samples)

    def stop(self):
        self.stop_event.set()


# --------------------------------------------------------------------------- cluster

class Formation:
    def __init__(self, args):
        self.args = args
        self.pw = pwd.getpwnam("postgres")
        parent = args.dir or ("/var/tmp" if os.path.isdir("/var/tmp") else None)
        self.base = tempfile.mkdtemp(prefix="pgaf-bench-", dir=parent)
        os.chmod(self.base, 0o755)
        os.chown(self.base, self.pw.pw_uid, self.pw.pw_gid)
        for d in ("config", "share", "run", "logs"):
            p = os.path.join(self.base, d)
            os.mkdir(p, 0o700)
            os.chown(p, self.pw.pw_uid, self.pw.pw_gid)
        self.env = {
            "HOME": self.base,
            "USER": "postgres", "LOGNAME": "postgres",
            "PATH": f"{PG_BIN}:/usr/local/bin:/usr/bin:/bin",
            "XDG_CONFIG_HOME": os.path.join(self.base, "config"),
            "XDG_DATA_HOME": os.path.join(self.base, "share"),
            "XDG_RUNTIME_DIR": os.path.join(self.base, "run"),
            "LANG": "C.UTF-8",
        }
        mp, p1, p2 = free_ports(3)
        self.monitor = {"name": "monitor", "port": mp,
                        "pgdata": os.path.join(self.base, "monitor"), "proc": None}
        self.nodes = [
            {"name": "node1", "port": p1, "pgdata": os.path.join(self.base, "node1"), "proc": None},
            {"name": "node2", "port": p2, "pgdata": os.path.join(self.base, "node2"), "proc": None},
        ]
        self.monitor_uri = (f"postgres://autoctl_node@{HOST}:{mp}/pg_auto_failover"
                            f"?sslmode={'disable' if args.no_ssl else 'require'}")
        self.ssl_args = ["--no-ssl"] if args.no_ssl else ["--ssl-self-signed"]
        self.all_procs = []
        self.log_files = []

    # -- processes

    def _spawn(self, name, argv):
        logpath = os.path.join(self.base, "logs", f"{name}.log")
        f = open(logpath, "ab")
        self.log_files.append(f)
        log(f"start ({name}, as user postgres): {' '.join(argv)}")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                env=self.env, cwd=self.base, user="postgres", group="postgres",
                                extra_groups=[], start_new_session=True)
        self.all_procs.append(proc)
        return proc

    def autoctl(self, *argv, check=True, timeout=120):
        """Run a short pg_autoctl command as the postgres user; return stdout."""
        r = subprocess.run([PG_AUTOCTL, *argv], capture_output=True, text=True, env=self.env,
                           cwd=self.base, user="postgres", group="postgres", extra_groups=[],
                           timeout=timeout)
        if check and r.returncode != 0:
            raise Abort(f"pg_autoctl {' '.join(argv)} failed ({r.returncode}): "
                        f"{r.stderr.strip()[-2000:]}")
        return r

    def connect(self, port, dbname="postgres"):
        import psycopg2
        c = psycopg2.connect(host=HOST, port=port, user="postgres", dbname=dbname,
                             connect_timeout=3, sslmode="disable" if self.args.no_ssl else "require")
        c.autocommit = True
        return c

    def start_monitor(self):
        m = self.monitor
        m["proc"] = self._spawn("monitor", [
            PG_AUTOCTL, "create", "monitor", "--pgdata", m["pgdata"], "--pgport", str(m["port"]),
            "--hostname", HOST, "--auth", "trust", *self.ssl_args, "--pgctl", PG_CTL, "--run"])
        deadline = time.monotonic() + 120
        while True:
            self._check_alive(m)
            try:
                c = self.connect(m["port"], "pg_auto_failover")
                with c.cursor() as cur:
                    cur.execute("SELECT extversion FROM pg_extension WHERE extname='pgautofailover'")
                    row = cur.fetchone()
                c.close()
                if row:
                    log(f"monitor up on port {m['port']}, extension pgautofailover {row[0]}")
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise Abort("monitor did not come up in 120 s (see logs/monitor.log)")
            time.sleep(0.5)

    def tune_monitor(self):
        c = self.connect(self.monitor["port"], "pg_auto_failover")
        with c.cursor() as cur:
            for k, v in TUNED_MONITOR.items():
                cur.execute(f"ALTER SYSTEM SET {k} = %s", (v,))
            cur.execute("SELECT pg_reload_conf()")
        time.sleep(1)
        with c.cursor() as cur:
            cur.execute("SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                        (list(TUNED_MONITOR),))
            got = dict(cur.fetchall())
        c.close()
        for k, v in TUNED_MONITOR.items():
            if got.get(k) != v:
                raise Abort(f"monitor setting {k} is {got.get(k)!r}, wanted {v!r}")
        log(f"monitor tuned: {got}")

    def monitor_settings(self):
        c = self.connect(self.monitor["port"], "pg_auto_failover")
        with c.cursor() as cur:
            cur.execute("SELECT name, setting FROM pg_settings WHERE name LIKE 'pgautofailover.%' "
                        "ORDER BY name")
            rows = dict(cur.fetchall())
        c.close()
        return rows

    def keeper_settings(self, node):
        got = {}
        for k in ("timeout.network_partition_timeout", "timeout.prepare_promotion_catchup",
                  "timeout.prepare_promotion_walreceiver",
                  "timeout.postgresql_restart_failure_timeout",
                  "timeout.postgresql_restart_failure_max_retries"):
            r = self.autoctl("config", "get", "--pgdata", node["pgdata"], k, check=False)
            got[k] = r.stdout.strip() if r.returncode == 0 else None
        return got

    def tune_keeper(self, node):
        for k, v in TUNED_KEEPER.items():
            self.autoctl("config", "set", "--pgdata", node["pgdata"], k, v)
        self.autoctl("reload", "--pgdata", node["pgdata"])
        log(f"{node['name']} keeper tuned: {TUNED_KEEPER}")

    def start_node(self, node, create=True):
        name = node["name"]
        if create:
            argv = [PG_AUTOCTL, "create", "postgres", "--pgdata", node["pgdata"],
                    "--pgport", str(node["port"]), "--hostname", HOST, "--name", name,
                    "--monitor", self.monitor_uri, "--auth", "trust", *self.ssl_args,
                    "--pgctl", PG_CTL, "--run"]
        else:
            argv = [PG_AUTOCTL, "run", "--pgdata", node["pgdata"]]
        node["proc"] = self._spawn(name, argv)

    def _check_alive(self, node):
        p = node["proc"]
        if p is not None and p.poll() is not None:
            raise Abort(f"pg_autoctl for {node['name']} exited with {p.returncode} "
                        f"(see {self.base}/logs/{node['name']}.log)")

    # -- state

    def state(self):
        r = self.autoctl("show", "state", "--monitor", self.monitor_uri, "--json",
                         check=False, timeout=30)
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def node_by_port(self, port):
        for n in self.nodes:
            if n["port"] == port:
                return n
        return None

    def steady(self):
        """(primary, secondary) when the formation is primary+secondary, both reported and
        assigned, and the primary has a sync/quorum standby in pg_stat_replication."""
        st = self.state()
        if not st or len(st) != 2:
            return None
        prim = [s for s in st if s["current_group_state"] == "primary"
                and s["assigned_group_state"] == "primary"]
        sec = [s for s in st if s["current_group_state"] == "secondary"
               and s["assigned_group_state"] == "secondary"]
        if len(prim) != 1 or len(sec) != 1:
            return None
        p, s = self.node_by_port(prim[0]["nodeport"]), self.node_by_port(sec[0]["nodeport"])
        try:
            c = self.connect(p["port"])
            with c.cursor() as cur:
                cur.execute("SELECT pg_is_in_recovery(), "
                            "(SELECT count(*) FROM pg_stat_replication "
                            " WHERE sync_state IN ('sync','quorum') AND state = 'streaming')")
                in_rec, nsync = cur.fetchone()
            c.close()
        except Exception:
            return None
        if in_rec or nsync < 1:
            return None
        return p, s

    def wait_steady(self, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            for n in [self.monitor, *self.nodes]:
                self._check_alive(n)
            r = self.steady()
            if r:
                return r
            if time.monotonic() > deadline:
                raise Abort(f"formation not back to primary+secondary in sync within {timeout} s "
                            f"({what}); last state: {json.dumps(self.state())}")
            time.sleep(0.25)

    def describe(self):
        r = self.autoctl("show", "state", "--monitor", self.monitor_uri, check=False)
        return r.stdout

    # -- teardown

    def cleanup(self, keep=False):
        # nodes first, then the monitor: SIGTERM to each pg_autoctl (it stops its Postgres)
        for group in (self.all_procs[1:] if self.all_procs else [], self.all_procs[:1]):
            for p in group:
                if p.poll() is None:
                    try:
                        p.send_signal(signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + 30
            for p in group:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        # whatever is left: the process groups of our pg_autoctl processes, then postmasters
        for p in self.all_procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for n in [*self.nodes, self.monitor]:
            pid = postmaster_pid(n["pgdata"])
            if pid and pid_alive(pid):
                try:
                    cmd = open(f"/proc/{pid}/cmdline", "rb").read()
                except OSError:
                    cmd = b""
                if n["pgdata"].encode() in cmd:
                    log(f"postmaster {pid} of {n['name']} still alive: SIGKILL")
                    os.kill(pid, signal.SIGKILL)
        for f in self.log_files:
            try:
                f.close()
            except Exception:
                pass
        if keep:
            log(f"kept {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)
            log(f"removed {self.base}")


# --------------------------------------------------------------------------- measurements

def wait_first_ok_after(writer, since_index, t_from, timeout):
    """Index-ordered scan for the first successful write that started at/after t_from."""
    deadline = time.monotonic() + timeout
    idx = since_index
    while True:
        samples = writer.snapshot(idx)
        for i, s in enumerate(samples):
            if s[2] and s[0] >= t_from:
                return since_index + (idx - since_index) + i, s
        idx += len(samples)
        if time.monotonic() > deadline:
            return None, None
        time.sleep(0.01)


def writes_ok_now(writer, timeout=30):
    """Wait until the writer has a successful write that started now or later."""
    t = time.monotonic()
    _, s = wait_first_ok_after(writer, max(0, writer.count() - 1), t, timeout)
    if s is None:
        raise Abort(f"client could not write for {timeout} s on a steady formation")
    return s


def failover_rep(f, writer, rep, n, args):
    prim, sec = f.wait_steady(args.steady_timeout, "before failover")
    writes_ok_now(writer)
    time.sleep(args.settle)
    pid = postmaster_pid(prim["pgdata"])
    if not pid or not pid_alive(pid):
        raise Abort(f"no live postmaster for primary {prim['name']}")
    idx0 = writer.count()
    # kill
    t_kill = time.monotonic()
    if args.kill == "node":
        os.kill(pid, signal.SIGKILL)
        os.killpg(prim["proc"].pid, signal.SIGKILL)
    else:
        os.kill(pid, signal.SIGKILL)
    i_ok, s_ok = wait_first_ok_after(writer, max(0, idx0 - 2), t_kill, args.rep_timeout)
    if s_ok is None:
        raise Abort(f"failover rep {rep}: no successful write within {args.rep_timeout} s")
    rto = s_ok[1] - t_kill
    window = writer.snapshot(max(0, idx0 - 2))
    errors = [s for s in window if not s[2] and s[1] >= t_kill and s[0] <= s_ok[0]]
    last_ok_before = [s for s in window if s[2] and s[1] < t_kill]
    gap = s_ok[1] - last_ok_before[-1][1] if last_ok_before else None
    new_node = f.node_by_port(s_ok[3])
    if args.kill == "node":
        prim["proc"].wait(timeout=10)
        f.start_node(prim, create=False)
    f.wait_steady(args.steady_timeout, f"after failover rep {rep}")
    t_back = time.monotonic() - t_kill
    err_kinds = error_kinds(errors)
    res = {
        "rep": rep, "killed": prim["name"], "killed_port": prim["port"], "killed_pid": pid,
        "kill": args.kill, "rto_s": round(rto, 4), "errors": len(errors),
        "gap_between_acks_s": round(gap, 4) if gap is not None else None,
        "first_write_on": new_node["name"] if new_node else s_ok[3],
        "failed_over": bool(new_node and new_node is not prim),
        "back_in_sync_s": round(t_back, 3), "error_kinds": err_kinds,
    }
    out(f"failover   {rep:2d}/{n}: kill -9 {args.kill} {prim['name']} -> first write ok after "
        f"{rto:7.3f} s on {res['first_write_on']} "
        f"({'failed over' if res['failed_over'] else 'restarted in place'}); errors {len(errors):3d}; "
        f"back in sync after {t_back:6.2f} s")
    return res


def switchover_rep(f, writer, rep, n, args):
    prim, sec = f.wait_steady(args.steady_timeout, "before switchover")
    writes_ok_now(writer)
    time.sleep(args.settle)
    idx0 = writer.count()
    t_cmd = time.monotonic()
    r = f.autoctl("perform", "switchover", "--monitor", f.monitor_uri, check=False, timeout=180)
    t_cmd_end = time.monotonic()
    if r.returncode != 0:
        log(f"pg_autoctl perform switchover exited {r.returncode}: {r.stderr.strip()[-500:]}")
    f.wait_steady(args.steady_timeout, f"after switchover rep {rep}")
    t_steady = time.monotonic()
    s_after = writes_ok_now(writer, timeout=args.rep_timeout)
    time.sleep(0.5)
    window = writer.snapshot(max(0, idx0 - 3))
    oks = [s for s in window if s[2]]
    before = [s for s in oks if s[1] < t_cmd]
    considered = ([before[-1]] if before else []) + [s for s in oks if s[1] >= t_cmd]
    # the longest gap between consecutive acknowledgements from the last ack before the
    # command to the first ack that started after the formation was steady again
    considered = [s for s in considered if s[1] <= s_after[1]]
    gaps = [(b[1] - a[1], a, b) for a, b in zip(considered, considered[1:])]
    pause, a, b = max(gaps, key=lambda g: g[0]) if gaps else (None, None, None)
    errors = [s for s in window if not s[2] and s[1] >= t_cmd and s[0] <= s_after[0]]
    err_kinds = error_kinds(errors)
    new_prim = f.node_by_port(s_after[3])
    res = {
        "rep": rep, "from": prim["name"], "to": new_prim["name"] if new_prim else s_after[3],
        "pause_s": round(pause, 4) if pause is not None else None, "errors": len(errors),
        "pause_starts_after_cmd_s": round(a[1] - t_cmd, 3) if a else None,
        "command_s": round(t_cmd_end - t_cmd, 3), "command_rc": r.returncode,
        "back_in_sync_s": round(t_steady - t_cmd, 3), "error_kinds": err_kinds,
    }
    out(f"switchover {rep:2d}/{n}: {prim['name']} -> {res['to']}: write pause {pause:7.3f} s; "
        f"errors {len(errors):3d}; command {res['command_s']:5.2f} s (rc {r.returncode}); "
        f"back in sync after {res['back_in_sync_s']:6.2f} s")
    return res


ERROR_KINDS = [
    ("read-only", "no read-write server (session is read-only / in recovery)"),
    ("in hot standby", "no read-write server (session is read-only / in recovery)"),
    ("recovery", "no read-write server (session is read-only / in recovery)"),
    ("starting up", "the database system is starting up"),
    ("shutting down", "the database system is shutting down"),
    ("server closed the connection", "server closed the connection"),
    ("terminating connection", "connection terminated by the server"),
    ("Connection refused", "connection refused"),
    ("timeout expired", "connect timeout"),
]


def error_kinds(errors):
    kinds = {}
    for e in errors:
        msg = e[4] or "?"
        k = next((name for needle, name in ERROR_KINDS if needle in msg), msg[:80])
        kinds[k] = kinds.get(k, 0) + 1
    return kinds


def merge_kinds(results):
    total = {}
    for r in results:
        for k, v in r["error_kinds"].items():
            total[k] = total.get(k, 0) + v
    return total


def summarize(values):
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"n": len(values), "p50": percentile(values, 0.50), "p99": percentile(values, 0.99),
            "max": max(values), "min": min(values)}


# --------------------------------------------------------------------------- machine

def machine_info():
    def first_line(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout.strip().splitlines() or [""])[0]
        except Exception:
            return None
    mem = None
    cpu = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psycopg2
    lib = psycopg2.extensions.libpq_version()
    return {
        "nproc": os.cpu_count(), "memory": mem, "cpu": cpu, "kernel": platform.release(),
        "os": first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "postgres": first_line([f"{PG_BIN}/postgres", "--version"]),
        "pg_auto_failover": first_line([PG_AUTOCTL, "--version"]),
        "python": platform.python_version(),
        "psycopg2": psycopg2.__version__.split()[0],
        "libpq": f"{lib // 10000}.{lib % 10000}",
    }


# --------------------------------------------------------------------------- main

def parse_args():
    ap = argparse.ArgumentParser(
        description="pg_auto_failover failover (kill -9 of the primary) and planned switchover, "
                    "as a client writing every 50 ms sees them.")
    ap.add_argument("--install", action="store_true",
                    help="apt-get install the missing Debian packages (needs root)")
    ap.add_argument("--repetitions", type=int, default=20, help="per scenario (default 20)")
    ap.add_argument("--scenarios", default="failover,switchover",
                    help="comma-separated: failover, switchover (default both)")
    ap.add_argument("--kill", choices=["postmaster", "node"], default="postmaster",
                    help="failover: kill -9 only the primary's postmaster (default; its "
                         "pg_autoctl keeper keeps running) or the whole node (its pg_autoctl "
                         "processes and postmaster, like a lost machine; pg_autoctl run restarts "
                         "it afterwards)")
    ap.add_argument("--tuned", action="store_true",
                    help="lower the monitor's health-check/demote timeouts and the keepers' "
                         "timeouts (see README); default: pg_autoctl's defaults")
    ap.add_argument("--interval-ms", type=float, default=50.0, help="client write interval (50)")
    ap.add_argument("--connect-timeout", type=int, default=2,
                    help="libpq connect_timeout in s (2, libpq's minimum)")
    ap.add_argument("--ssl", dest="no_ssl", action="store_false",
                    help="use --ssl-self-signed instead of --no-ssl")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="s of steady writes before each kill/switchover (2)")
    ap.add_argument("--steady-timeout", type=float, default=300.0,
                    help="s to wait for primary+secondary in sync (300)")
    ap.add_argument("--rep-timeout", type=float, default=300.0,
                    help="s to wait for the first successful write (300)")
    ap.add_argument("--dir", help="parent directory for the throw-away formation (default /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the directory (logs) at exit")
    ap.add_argument("--json", help="write settings, machine, raw samples and summary here")
    return ap.parse_args()


def main():
    args = parse_args()
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in scenarios:
        if s not in ("failover", "switchover"):
            raise Abort(f"unknown scenario {s!r}")
    if os.geteuid() != 0:
        raise Abort("run as root: the script starts pg_autoctl as the postgres OS user "
                    "(PostgreSQL refuses to run as root) and kill -9s its postmaster; "
                    "--install also needs root for apt-get")
    if args.install:
        install_packages()
    missing = [p for p in PACKAGES if not dpkg_installed(p)]
    if missing:
        raise Abort(f"missing Debian packages: {' '.join(missing)} (run with --install)")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise Abort("no postgres OS user (it comes with the postgresql-common package)")

    machine = machine_info()
    out("# pg_auto_failover failover and switchover as a client sees it")
    out(f"# machine: nproc={machine['nproc']} memory={machine['memory']} cpu=\"{machine['cpu']}\" "
        f"kernel={machine['kernel']} os=\"{machine['os']}\"")
    out(f"# versions: {machine['postgres']}; {machine['pg_auto_failover']}; "
        f"python {machine['python']}, psycopg2 {machine['psycopg2']}, libpq {machine['libpq']}")

    f = Formation(args)
    stop_signals = {}

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        stop_signals[sig] = signal.signal(sig, on_signal)

    writer = None
    result = {"settings": None, "machine": machine, "failover": [], "switchover": []}
    try:
        f.start_monitor()
        if args.tuned:
            f.tune_monitor()
        f.start_node(f.nodes[0])
        deadline = time.monotonic() + 180
        while True:
            f._check_alive(f.nodes[0])
            st = f.state()
            if st and any(s["current_group_state"] == "single" for s in st):
                break
            if time.monotonic() > deadline:
                raise Abort("node1 did not reach state single in 180 s")
            time.sleep(0.5)
        f.start_node(f.nodes[1])
        prim, sec = f.wait_steady(300, "initial setup")
        if args.tuned:
            for n in f.nodes:
                f.tune_keeper(n)
        log("formation steady:\n" + f.describe())
        c = f.connect(prim["port"])
        with c.cursor() as cur:
            cur.execute("CREATE TABLE failover_bench (id bigserial PRIMARY KEY, "
                        "at timestamptz NOT NULL DEFAULT clock_timestamp(), port int NOT NULL)")
            cur.execute("SHOW synchronous_standby_names")
            ssn = cur.fetchone()[0]
            cur.execute("SHOW synchronous_commit")
            sc = cur.fetchone()[0]
        c.close()
        f.wait_steady(60, "after CREATE TABLE")

        dsn = (f"host={HOST},{HOST} port={f.nodes[0]['port']},{f.nodes[1]['port']} "
               f"dbname=postgres user=postgres target_session_attrs=read-write "
               f"connect_timeout={args.connect_timeout} "
               f"sslmode={'disable' if args.no_ssl else 'require'} "
               f"application_name=failover_bench")
        settings = {
            "timing": "tuned" if args.tuned else "pg_autoctl defaults",
            "monitor_settings": f.monitor_settings(),
            "keeper_settings": f.keeper_settings(f.nodes[0]),
            "ssl": "--no-ssl (plain TCP on loopback)" if args.no_ssl else "--ssl-self-signed",
            "auth": "--auth trust (loopback)",
            "kill": args.kill,
            "client_dsn": dsn,
            "write": "INSERT INTO failover_bench(port) VALUES (inet_server_port()) RETURNING id, "
                     "port; autocommit; one attempt every %g ms, reconnect on error" % args.interval_ms,
            "interval_ms": args.interval_ms,
            "synchronous_standby_names": ssn, "synchronous_commit": sc,
            "repetitions": args.repetitions, "settle_s": args.settle,
            "ports": {"monitor": f.monitor["port"], "node1": f.nodes[0]["port"],
                      "node2": f.nodes[1]["port"]},
            "data_dir": f.base,
        }
        result["settings"] = settings
        out(f"# timing: {settings['timing']}")
        out("# monitor: " + " ".join(f"{k.split('.',1)[1]}={v}"
                                    for k, v in settings["monitor_settings"].items()))
        out("# keepers: " + " ".join(f"{k}={v}" for k, v in settings["keeper_settings"].items()))
        out(f"# ssl: {settings['ssl']}; auth: trust; synchronous_standby_names='{ssn}' "
            f"synchronous_commit={sc}")
        out(f"# client: {dsn}")
        out(f"# client write: {settings['write']}")
        out(f"# failover kill: kill -9 of the primary's "
            f"{'postmaster (its pg_autoctl keeper keeps running)' if args.kill == 'postmaster' else 'postmaster and its pg_autoctl processes (whole node; pg_autoctl run restarts it afterwards)'}")

        writer = Writer(dsn, args.interval_ms / 1000.0)
        writer.start()
        writes_ok_now(writer)

        for scenario in scenarios:
            for rep in range(1, args.repetitions + 1):
                if scenario == "failover":
                    result["failover"].append(failover_rep(f, writer, rep, args.repetitions, args))
                else:
                    result["switchover"].append(switchover_rep(f, writer, rep, args.repetitions, args))

        # every acknowledged write must still be there
        prim, _ = f.wait_steady(args.steady_timeout, "final check")
        writer.stop()
        writer.join(timeout=30)
        c = f.connect(prim["port"])
        with c.cursor() as cur:
            cur.execute("SELECT id FROM failover_bench")
            present = {r[0] for r in cur.fetchall()}
        c.close()
        acked = set(writer.acked_ids)
        lost = sorted(acked - present)
        samples = writer.snapshot()
        result["acknowledged_writes"] = len(acked)
        result["acknowledged_writes_missing"] = len(lost)
        result["attempts"] = len(samples)
        result["attempts_failed"] = sum(1 for s in samples if not s[2])

        out()
        out(f"# summary ({settings['timing']}, nearest-rank percentiles; with 20 samples p99 is "
            f"the 20th of 20, i.e. the maximum)")
        summary = {}
        if result["failover"]:
            fo = result["failover"]
            summary["failover_rto_s"] = summarize([r["rto_s"] for r in fo])
            summary["failover_errors"] = summarize([r["errors"] for r in fo])
            summary["failover_back_in_sync_s"] = summarize([r["back_in_sync_s"] for r in fo])
            s = summary["failover_rto_s"]
            e = summary["failover_errors"]
            out(f"failover (kill -9 {args.kill}) -> first successful write: n={s['n']} "
                f"p50={s['p50']:.3f} s p99={s['p99']:.3f} s max={s['max']:.3f} s min={s['min']:.3f} s; "
                f"errors per failover p50={e['p50']} max={e['max']} total={sum(r['errors'] for r in fo)}; "
                f"failed over to the other node {sum(r['failed_over'] for r in fo)}/{len(fo)}; "
                f"back in sync p50={summary['failover_back_in_sync_s']['p50']:.2f} s")
            summary["failover_error_kinds"] = merge_kinds(fo)
            out(f"  failover errors by kind: {summary['failover_error_kinds']}")
        if result["switchover"]:
            so = result["switchover"]
            summary["switchover_pause_s"] = summarize([r["pause_s"] for r in so])
            summary["switchover_errors"] = summarize([r["errors"] for r in so])
            summary["switchover_command_s"] = summarize([r["command_s"] for r in so])
            s = summary["switchover_pause_s"]
            e = summary["switchover_errors"]
            out(f"switchover (pg_autoctl perform switchover) write pause: n={s['n']} "
                f"p50={s['p50']:.3f} s p99={s['p99']:.3f} s max={s['max']:.3f} s min={s['min']:.3f} s; "
                f"errors per switchover p50={e['p50']} max={e['max']} total={sum(r['errors'] for r in so)}; "
                f"command p50={summary['switchover_command_s']['p50']:.2f} s")
            summary["switchover_error_kinds"] = merge_kinds(so)
            out(f"  switchover errors by kind: {summary['switchover_error_kinds']}")
        out(f"acknowledged writes: {len(acked)}, missing after the run: {len(lost)}"
            + (f" (ids {lost[:20]})" if lost else ""))
        result["summary"] = summary
        result["samples"] = [{"start": round(s[0] - T0, 4), "end": round(s[1] - T0, 4), "ok": s[2],
                              "port": s[3], "error": s[4]} for s in samples]
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
            log(f"wrote {args.json}")
        return 0
    except (Abort, KeyboardInterrupt) as e:
        log(f"stopping: {type(e).__name__}: {e}")
        if args.json and (result["failover"] or result["switchover"]):
            result["incomplete"] = str(e)
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
            log(f"wrote partial results to {args.json}")
        if not args.keep and isinstance(e, Abort):
            for n in [f.monitor, *f.nodes]:
                p = os.path.join(f.base, "logs", f"{n['name']}.log")
                try:
                    tail = open(p, errors="replace").read().splitlines()[-15:]
                    log(f"--- last lines of {n['name']}.log:\n" + "\n".join(tail))
                except OSError:
                    pass
        return 1
    finally:
        if writer is not None:
            writer.stop()
        # do not let a second Ctrl-C interrupt the cleanup
        for sig in stop_signals:
            signal.signal(sig, signal.SIG_IGN)
        f.cleanup(keep=args.keep)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Abort as e:
        log(f"ERROR: {e}")
        sys.exit(1)

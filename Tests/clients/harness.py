"""Starts a real Apiary node (or, with --through-gateway, a node under a monitor behind a gateway;
or, with --through-standby, a primary and its standby, the clients pointed at the standby) for
the rqlite client tests, runs them, stops it.

What a user does, with the commands the README gives: `apiary certs init`, `apiary certs
issue`, `apiary node --mode single` on loopback, `apiary ctl tenant create`, `apiary ctl user
create --password-stdin`. The clients then connect with only a host, a port and credentials;
the cluster CA is trusted through SSL_CERT_FILE (Python's default TLS context reads it), so no
client is configured beyond what its README shows.

rqdb speaks plain HTTP and sends no credentials (it has no option for either), so it reaches
the node through a sidecar (`sidecar.py`) that adds TLS and basic auth, as a deployment
would put stunnel or nginx beside such a client.

Run through run.sh, which makes the virtual environment.
"""

import argparse
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
READY_TIMEOUT_S = 120


def run(apiary, *args, stdin=None):
    """Runs an apiary subcommand; its output is the test's evidence when it fails."""
    done = subprocess.run([apiary, *args], input=stdin, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"apiary {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


class Server:
    """One apiary process (node, monitor, gateway) on loopback; its output goes to a log file.
    `port` is the one its ready line ends with (`... ready: ... https://h:p`)."""

    def __init__(self, apiary, directory, certs, label, args):
        self.apiary = apiary
        self.certs = certs
        self.label = label
        self.log_path = os.path.join(directory, f"{label}.log")
        env = dict(os.environ, APIARY_EXIT_WITH_PARENT=str(os.getpid()))
        # Unbuffered: select() must see every line that has not been read yet.
        self.process = subprocess.Popen([apiary, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, bufsize=0)
        self._printed = ""
        self._printed_changed = threading.Condition()
        self.port = self._wait_until_ready()
        self._copier = threading.Thread(target=self._copy_output, daemon=True)
        self._copier.start()

    def _wait_until_ready(self):
        """Reads the output up to the ready line; returns the port it ends with."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        seen = b""
        with open(self.log_path, "ab") as log:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"the {self.label} did not become ready within {READY_TIMEOUT_S}s:\n{seen.decode(errors='replace')}")
                ready, _, _ = select.select([self.process.stdout], [], [], left)
                if not ready:
                    continue
                line = self.process.stdout.readline()
                if not line:
                    raise RuntimeError(f"the {self.label} exited before it became ready:\n{seen.decode(errors='replace')}")
                log.write(line)
                seen += line
                text = line.decode(errors="replace")
                with self._printed_changed:
                    self._printed += text
                if " ready: " in text and "=https://" in text:
                    return int(text.rsplit(":", 1)[1].strip())

    def _copy_output(self):
        with open(self.log_path, "ab") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                with self._printed_changed:
                    self._printed += line.decode(errors="replace")
                    self._printed_changed.notify_all()
        with self._printed_changed:
            self._printed += "\n(exited)"
            self._printed_changed.notify_all()

    def wait_for(self, text):
        """Waits until the process has printed `text`."""
        with self._printed_changed:
            if not self._printed_changed.wait_for(lambda: text in self._printed or "(exited)" in self._printed, timeout=READY_TIMEOUT_S) \
                    or text not in self._printed:
                raise RuntimeError(f"the {self.label} did not print '{text}':\n{self.log_tail()}")

    def ctl(self, *args, stdin=None):
        return run(self.apiary, "ctl", *args, "--node", f"127.0.0.1:{self.port}", "--certs", self.certs, stdin=stdin)

    def log_tail(self, lines=60):
        try:
            with open(self.log_path, errors="replace") as log:
                return "".join(log.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(apiary, directory, through):
    """A node alone (`--mode single`); through a "gateway", under a monitor (a formation of one)
    and behind a gateway; through a "standby", a primary replicating to a standby that sends
    applications to it (301, `--peer-api`). Returns the servers (the primary first) and the
    port clients use."""
    certs = os.path.join(directory, "certs")
    run(apiary, "certs", "init", "--dir", certs)
    run(apiary, "certs", "issue", "--dir", certs, "--role", "node", "--name", "n1")
    run(apiary, "certs", "issue", "--dir", certs, "--role", "operator", "--name", "operator")
    node_args = ["node", "--name", "n1", "--role", "primary", "--mode", "single", "--data", os.path.join(directory, "data"),
                 "--certs", certs, "--api", "127.0.0.1:0", "--replication", "127.0.0.1:0"]
    if through is None:
        node = Server(apiary, directory, certs, "node", node_args)
        return [node], node.port
    if through == "standby":
        run(apiary, "certs", "issue", "--dir", certs, "--role", "node", "--name", "n2")
        replication = free_port()
        primary = Server(apiary, directory, certs, "primary",
                         ["node", "--name", "n1", "--role", "primary", "--mode", "sync", "--standby", "n2",
                          "--data", os.path.join(directory, "data-1"), "--certs", certs,
                          "--api", "127.0.0.1:0", "--replication", f"127.0.0.1:{replication}"])
        standby = Server(apiary, directory, certs, "standby",
                         ["node", "--name", "n2", "--role", "standby", "--primary", f"127.0.0.1:{replication}",
                          "--peer-api", f"127.0.0.1:{primary.port}", "--data", os.path.join(directory, "data-2"),
                          "--certs", certs, "--api", "127.0.0.1:0", "--replication", "127.0.0.1:0"])
        # It sends applications to the primary only while it streams from it.
        standby.wait_for("streaming from the primary: applications are redirected to it")
        return [primary, standby], standby.port
    run(apiary, "certs", "issue", "--dir", certs, "--role", "monitor", "--name", "monitor")
    run(apiary, "certs", "issue", "--dir", certs, "--role", "gateway", "--name", "gw")
    monitor = Server(apiary, directory, certs, "monitor",
                     ["monitor", "--name", "monitor", "--data", os.path.join(directory, "monitor"), "--certs", certs,
                      "--listen", "127.0.0.1:0", "--formation", "clients", "--primary", "n1"])
    node = Server(apiary, directory, certs, "node", node_args + ["--monitor", f"127.0.0.1:{monitor.port}"])
    gateway = Server(apiary, directory, certs, "gateway",
                     ["gateway", "--name", "gw", "--certs", certs, "--listen", "127.0.0.1:0",
                      "--monitor", f"127.0.0.1:{monitor.port}", "--node", f"n1=127.0.0.1:{node.port}"])
    return [node, monitor, gateway], gateway.port


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--apiary", required=True)
    parser.add_argument("--keep", action="store_true", help="keep the cluster's directory")
    parser.add_argument("--through-gateway", action="store_true",
                        help="run the node under a monitor, behind a gateway, and point the clients at the gateway")
    parser.add_argument("--through-standby", action="store_true",
                        help="run a primary and its standby, and point the clients at the standby (they follow its 301s)")
    options, unittest_args = parser.parse_known_args()
    through = "gateway" if options.through_gateway else "standby" if options.through_standby else None

    directory = tempfile.mkdtemp(prefix="apiary-clients-")
    servers = []
    sidecar = None
    ok = False
    try:
        servers, client_port = start_cluster(options.apiary, directory, through)
        node = servers[0]
        users = {}
        for tenant in ("acme", "globex"):
            node.ctl("tenant", "create", tenant)
        for name, tenant, role in (("acme-writer", "acme", "writer"), ("acme-reader", "acme", "reader"),
                                   ("globex-writer", "globex", "writer")):
            password = secrets.token_urlsafe(18)
            node.ctl("user", "create", name, "--tenant", tenant, "--role", role, "--password-stdin", stdin=password + "\n")
            users[name] = password

        import sidecar as sidecar_module  # noqa: E402 (after the environment is ready)
        ca = os.path.join(node.certs, "ca.pem")
        sidecar = sidecar_module.Sidecar(upstream_port=client_port, ca_path=ca,
                                         user="acme-writer", password=users["acme-writer"])

        os.environ.update({
            # The cluster CA, for Python's default TLS context (http.client, aiohttp).
            "SSL_CERT_FILE": ca,
            "APIARY_HOST": "127.0.0.1",
            "APIARY_PORT": str(client_port),
            "APIARY_CA": ca,
            "APIARY_WRITER": "acme-writer",
            "APIARY_WRITER_PASSWORD": users["acme-writer"],
            "APIARY_READER": "acme-reader",
            "APIARY_READER_PASSWORD": users["acme-reader"],
            "APIARY_OTHER_TENANT_WRITER": "globex-writer",
            "APIARY_OTHER_TENANT_WRITER_PASSWORD": users["globex-writer"],
            "RQDB_HOST": f"127.0.0.1:{sidecar.port}",
        })
        if through == "standby":
            # The sidecar passes the standby's 301 on: its https Location is past the sidecar,
            # and rqdb speaks plain HTTP only.
            os.environ["APIARY_RQDB_SKIP"] = "rqdb reaches the cluster through a plain-HTTP sidecar; a standby's 301 names the primary's https address, past it"
        sys.path.insert(0, HERE)
        program = unittest.main(module=None, argv=["clients", "discover", "-s", HERE, "-p", "test_*.py", "-v", *unittest_args],
                                exit=False)
        ok = program.result.wasSuccessful() and program.result.testsRun > 0
        if program.result.testsRun == 0:
            print("no tests ran", file=sys.stderr)
    except Exception as error:  # noqa: BLE001 (reported, then the run fails)
        print(f"harness failed: {error}", file=sys.stderr)
    finally:
        if sidecar:
            sidecar.stop()
        for server in reversed(servers):
            server.stop()
            if not ok:
                print(f"---- {server.label} log (tail) ----\n" + server.log_tail(), file=sys.stderr)
        if options.keep:
            print(f"kept {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()

"""The brokers bench/fleet.py measures: a private mosquitto (one plain loopback
listener, no connection limit, no persistence) and a RabbitMQ cluster of private
nodes (tests/fixtures/rabbitmq.py), each with its client URLs and processes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Protocol

from bench import procstat
from tests.fixtures.procs import LOOPBACK, free_ports, spawn, stop_process, wait_for_ports
from tests.fixtures.rabbitmq import RabbitCluster, start_rabbitmq


class Broker(Protocol):
    """A running broker: its client URLs (devices spread over them) and its processes."""

    kind: str
    urls: list[str]
    host: str
    port: int
    note: str

    def pids(self) -> list[int]: ...

    def stop(self) -> None: ...


class MosquittoBroker:
    """A private mosquitto for the benchmark: one plain loopback listener, no connection limit,
    no persistence (nothing to restore), $SYS every second."""

    kind = "mosquitto"

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        self.host, self.port = LOOPBACK, free_ports(1)[0]
        self.urls = [f"mqtt://{self.host}:{self.port}"]
        binary = shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin") or "mosquitto"
        user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
        conf = directory / "mosquitto.conf"
        conf.write_text(f"""# written by bench/fleet.py
user {user}
listener {self.port} {self.host}
allow_anonymous true
max_connections -1
persistence false
sys_interval 1
max_queued_messages 10000
log_dest file {directory}/mosquitto.log
log_type error
log_type warning
log_type notice
connection_messages false
""")
        self.proc = spawn([binary, "-c", str(conf)], directory / "stdout.log")
        wait_for_ports(self.proc, [self.port], 10, "mosquitto", directory / "mosquitto.log")
        version = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False).stdout.splitlines()
        limits = Path(f"/proc/{self.proc.pid}/limits").read_text().splitlines()
        nofile = next((line.split()[3] for line in limits if line.startswith("Max open files")), "?")
        self.note = f"{version[0] if version else 'mosquitto'}; max_connections -1, open files {nofile}"

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc.poll() is None else []

    def stop(self) -> None:
        stop_process(self.proc)


class RabbitBroker:
    kind = "rabbitmq"

    def __init__(self, directory: Path, nodes: int) -> None:
        self.cluster: RabbitCluster = start_rabbitmq(directory, nodes)
        first = self.cluster.nodes[0]
        self.host, self.port = first.host, first.mqtt_port
        self.urls = [f"mqtt://{n.host}:{n.mqtt_port}" for n in self.cluster.nodes]
        version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"], capture_output=True,
                                 text=True, check=False).stdout
        self.note = f"RabbitMQ {version or '?'}, {nodes} nodes ({', '.join(n.nodename for n in self.cluster.nodes)})"

    def pids(self) -> list[int]:
        roots = [n._proc.pid for n in self.cluster.nodes if n._proc is not None]
        if self.cluster.epmd._proc is not None:
            roots.append(self.cluster.epmd._proc.pid)
        return [pid for root in roots for pid in procstat.descendants(root)]

    def stop(self) -> None:
        self.cluster.stop()


def start_broker(kind: str, directory: Path, rabbit_nodes: int) -> Broker:
    return MosquittoBroker(directory) if kind == "mosquitto" else RabbitBroker(directory, rabbit_nodes)

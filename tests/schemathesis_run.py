#!/usr/bin/env python3
"""Runs schemathesis against api/openapi.yaml on a live tern socket; see tests/openapi.rs.

usage: schemathesis_run.py TERN_BINARY ST_BINARY WORKDIR [MAX_EXAMPLES]

tern runs as an unprivileged user when we are root: generated bodies carry arbitrary file paths
(log_path, metrics_path, serial_out_path), and those must not land anywhere that matters. A
TCP-to-Unix proxy in this script counts every request and every 5xx answer, and flags a
request that gets no answer within 10 s as a hang. Prints one line "SCHEMATHESIS requests=N
server_errors=N hangs=N st_rc=N tern_alive=BOOL" and exits 0 only if all is well.
"""
import os, re, shutil, socket, subprocess, sys, threading, time

tern, st, work = sys.argv[1], sys.argv[2], sys.argv[3]
max_examples = sys.argv[4] if len(sys.argv) > 4 else "60"
here = os.path.dirname(os.path.abspath(__file__))
spec = os.path.join(here, "..", "api", "openapi.yaml")

shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
os.chmod(work, 0o777)
sock = os.path.join(work, "api.sock")
cmd = [tern, "--api-sock", sock, "--level", "Warning"]
if os.geteuid() == 0:
    cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] + cmd
    shutil.copy(tern, os.path.join(work, "tern"))
    os.chmod(os.path.join(work, "tern"), 0o755)
    cmd[cmd.index(tern)] = os.path.join(work, "tern")
log = open(os.path.join(work, "tern.log"), "w")
proc = subprocess.Popen(cmd, cwd=work, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

deadline = time.time() + 10
while not os.path.exists(sock):
    if time.time() > deadline or proc.poll() is not None:
        sys.exit(f"tern did not create its socket; see {work}/tern.log")
    time.sleep(0.01)

stats = {"requests": 0, "server_errors": 0, "hangs": 0}
lock = threading.Lock()
REQ = re.compile(rb"(?:^|\r\n)(?:GET|PUT|PATCH|POST|DELETE|HEAD|OPTIONS|TRACE|CONNECT) \S+ HTTP/1\.[01]\r\n")
RESP = re.compile(rb"HTTP/1\.[01] (\d{3})")


def pump(src, dst, is_client):
    buf = b""
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            buf = (buf + data)[-65536:]
            with lock:
                if is_client:
                    stats["requests"] += len(REQ.findall(data))
                else:
                    stats["server_errors"] += sum(1 for c in RESP.findall(data) if c.startswith(b"5"))
            dst.sendall(data)
    except socket.timeout:
        if not is_client:
            with lock:
                stats["hangs"] += 1
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listener):
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(sock)
        upstream.settimeout(10)
        threading.Thread(target=pump, args=(client, upstream, True), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client, False), daemon=True).start()


listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.bind(("127.0.0.1", 0))
listener.listen(64)
port = listener.getsockname()[1]
threading.Thread(target=serve, args=(listener,), daemon=True).start()

st_cmd = [st, "run", spec, "--url", f"http://127.0.0.1:{port}",
          "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
          "--max-examples", max_examples, "--workers", "1", "--request-timeout", "10",
          "--seed", "20261123", "--no-color"]
r = subprocess.run(st_cmd, cwd=work, capture_output=True, text=True, env=dict(os.environ, NO_COLOR="1"))
with open(os.path.join(work, "schemathesis.out"), "w") as f:
    f.write(r.stdout + r.stderr)

alive = proc.poll() is None
proc.terminate()
try:
    proc.wait(5)
except subprocess.TimeoutExpired:
    proc.kill()
print(f"SCHEMATHESIS requests={stats['requests']} server_errors={stats['server_errors']} "
      f"hangs={stats['hangs']} st_rc={r.returncode} tern_alive={alive}")
if r.returncode != 0:
    print(r.stdout[-6000:])
ok = r.returncode == 0 and alive and stats["server_errors"] == 0 and stats["hangs"] == 0
sys.exit(0 if ok else 1)

"""A tiny live-stream server for tests/test_stream.py: serves FILE over TCP on 127.0.0.1:PORT, paced at SPEED x real
time (DURATION seconds of media), to one client after another, until killed. With STALL (a fraction), it sends that
much of the file to its first client and then stalls: silent, connection open. Plain sockets: no torch, starts fast."""
import socket, sys, time

def main(path: str, port: int, duration: float, speed: float, stall: float | None = None) -> None:
    data = open(path, "rb").read()
    rate = len(data) / duration * speed                         # bytes per second
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port)); srv.listen(1)
    print("listening", flush=True)
    while True:
        conn, _ = srv.accept()
        t0, sent = time.monotonic(), 0
        try:
            while sent < (len(data) if stall is None else int(len(data) * stall)):
                n = min(8192, len(data) - sent)
                conn.sendall(data[sent:sent + n]); sent += n
                if (d := t0 + sent / rate - time.monotonic()) > 0: time.sleep(d)
            if stall is not None: time.sleep(3600)
        except OSError: pass
        finally: conn.close()

if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]),
         float(sys.argv[5]) if len(sys.argv) > 5 else None)

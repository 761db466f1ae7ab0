"""pki.py: test certificates made with openssl: two CAs and leaf certificates signed by them
(like tests/amqp/test_tls.sh). Shared by test_sna_sim.py and tests/e2e/sna_tls.py."""
import os
import subprocess

SERVER_EXT = "subjectAltName=DNS:{}\nextendedKeyUsage=serverAuth\n"
CLIENT_EXT = "extendedKeyUsage=clientAuth\n"


def openssl(*args):
    r = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {args[0]}: {r.stderr.strip()}")


def make_pki(d, leaves):
    """Under d (created): ca.pem/ca.key and other-ca.pem/.key, self-signed; for each
    (name, ca, ext) of leaves, name.pem/name.key signed by ca ("ca" or "other-ca") with the
    extensions ext (SERVER_EXT.format(host), CLIENT_EXT). Keys 0600, the rest 0644."""
    os.makedirs(d)
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=bw-test-{ca}",
                "-keyout", f"{d}/{ca}.key", "-out", f"{d}/{ca}.pem")
    for name, ca, ext in leaves:
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{d}/{name}.key",
                "-out", f"{d}/{name}.csr")
        with open(f"{d}/{name}.ext", "w") as fh:
            fh.write(ext)
        openssl("x509", "-req", "-in", f"{d}/{name}.csr", "-CA", f"{d}/{ca}.pem", "-CAkey", f"{d}/{ca}.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{d}/{name}.ext", "-out", f"{d}/{name}.pem")
    for f in os.listdir(d):
        os.chmod(os.path.join(d, f), 0o600 if f.endswith(".key") else 0o644)

//! TLS in front of a broker for tests: certificates made with the `openssl` command (a
//! CA, a server certificate for 127.0.0.1 signed by it, and an unrelated CA), and stunnel
//! terminating TLS on a loopback port and forwarding to the broker. The broker must
//! advertise stunnel's address (`laminar broker --advertise`), so that clients following
//! metadata come back through TLS.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::Error;

/// A running stunnel and the certificates; stopped and removed when dropped.
pub struct TlsFront {
    child: Child,
    dir: PathBuf,
    /// The CA that signed the server certificate: `ssl.ca.location` of clients.
    pub ca: PathBuf,
    /// A CA that did not: clients trusting only it must refuse the server.
    pub other_ca: PathBuf,
}

fn run(dir: &Path, program: &str, args: &[&str]) -> Result<(), Error> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

/// The stunnel binary, if one runs: `stunnel4` (Debian's name) or `stunnel`.
fn stunnel() -> Option<&'static str> {
    ["stunnel4", "stunnel"].into_iter().find(|b| {
        Command::new(b)
            .arg("-version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    })
}

impl TlsFront {
    /// TLS on `127.0.0.1:port`, forwarded to `target`. `None` when stunnel or openssl
    /// is missing, unless `LAMINAR_REQUIRE_TLS` is set (the test command installs both
    /// and sets it).
    pub fn start(port: u16, target: &str) -> Result<Option<Self>, Error> {
        let openssl = Command::new("openssl")
            .arg("version")
            .stdout(Stdio::null())
            .status()
            .is_ok();
        let Some(stunnel) = stunnel().filter(|_| openssl) else {
            if std::env::var_os("LAMINAR_REQUIRE_TLS").is_some() {
                return Err(
                    "LAMINAR_REQUIRE_TLS is set but stunnel or openssl does not run".into(),
                );
            }
            return Ok(None);
        };
        let dir = crate::temp_dir("tls")?;
        let new_ca = |name: &str| {
            run(
                &dir,
                "openssl",
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.pem"),
                    "-subj",
                    &format!("/CN=laminar test {name}"),
                ],
            )
        };
        new_ca("ca")?;
        new_ca("other")?;
        run(
            &dir,
            "openssl",
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        )?;
        std::fs::write(dir.join("san.cnf"), "subjectAltName=IP:127.0.0.1\n")?;
        run(
            &dir,
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "san.cnf",
                "-out",
                "server.pem",
            ],
        )?;
        std::fs::write(
            dir.join("stunnel.conf"),
            format!(
                "foreground = yes\npid =\noutput = {}\n[kafka]\naccept = 127.0.0.1:{port}\nconnect = {target}\ncert = {}\nkey = {}\n",
                dir.join("stunnel.log").display(),
                dir.join("server.pem").display(),
                dir.join("server.key").display(),
            ),
        )?;
        let child = Command::new(stunnel)
            .arg(dir.join("stunnel.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let front = Self {
            child,
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other.pem"),
            dir,
        };
        crate::wait_for_port(port, Duration::from_secs(20))?;
        Ok(Some(front))
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

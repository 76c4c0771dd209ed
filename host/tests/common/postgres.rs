//! A real PostgreSQL 15 for the tests: `initdb` and `pg_ctl` in a temporary directory, on a
//! free port, with its unix socket in that directory. PostgreSQL refuses to run as root: as
//! root, its commands run as the `postgres` user (`runuser`), which Debian's package makes.
//! Stopped (`-m immediate`) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN_DIRS: [&str; 1] = ["/usr/lib/postgresql/15/bin"];

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    as_root: bool,
    /// Serving TLS with a certificate for `localhost` and 127.0.0.1 signed by [`Postgres::ca`].
    tls: bool,
}

fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("EDDY_PG_BIN") {
        return PathBuf::from(dir);
    }
    BIN_DIRS
        .iter()
        .map(PathBuf::from)
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
        .unwrap_or_else(|| {
            panic!(
                "PostgreSQL 15 is not installed (no initdb/pg_ctl in {BIN_DIRS:?}; EDDY_PG_BIN=dir \
                 names another): `apt-get install postgresql` (`make test` does it when run as root)"
            )
        })
}

impl Postgres {
    /// Makes a cluster and starts it; the database `postgres`, the superuser `eddy`.
    pub fn start() -> Postgres {
        Postgres::start_with_tls(false)
    }

    /// [`Postgres::start`], serving TLS too (`ssl = on`) if `tls`.
    pub fn start_with_tls(tls: bool) -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::tempdir().expect("temp dir");
        let as_root = unsafe { libc::geteuid() } == 0;
        if as_root {
            // The server's user must own its directory (and reach it: the temp dir is 0700).
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown the PostgreSQL dir");
        }
        let port = super::host_process::free_port();
        let pg = Postgres {
            dir,
            bin,
            port,
            as_root,
            tls,
        };
        let out = pg.run_on_data(
            "initdb",
            &["-U", "eddy", "--auth=trust", "-E", "UTF8", "--no-sync"],
        );
        assert!(out.status.success(), "initdb: {}", lossy(&out));
        if tls {
            pg.make_certificates();
        }
        pg.start_server();
        pg
    }

    /// The CA that signed the server's certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A CA, and a server certificate it signed (for `localhost` and 127.0.0.1) in the data
    /// directory, where `ssl = on` looks for `server.crt` and `server.key`.
    fn make_certificates(&self) {
        let dir = self.dir.path();
        let data = self.data();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl (Debian's openssl package) makes the test certificates");
            assert!(out.status.success(), "openssl {args:?}: {}", lossy(&out));
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=eddy test CA",
        ]);
        let key = data.join("server.key").display().to_string();
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        let cert = data.join("server.crt").display().to_string();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
        // The server refuses a key others can read, and must own it.
        let status = Command::new("chmod").args(["600", &key]).status().unwrap();
        assert!(status.success());
        if self.as_root {
            let status = Command::new("chown")
                .args(["postgres:postgres", &key, &cert])
                .status()
                .unwrap();
            assert!(status.success());
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs `tool -D <data dir> args…`.
    fn run_on_data(&self, tool: &str, args: &[&str]) -> Output {
        let data = self.data().display().to_string();
        let mut all = vec!["-D", data.as_str()];
        all.extend_from_slice(args);
        self.run(tool, &all)
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"))
    }

    fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50 -c ssl={}",
            self.port,
            self.dir.path().display(),
            if self.tls { "on" } else { "off" },
        );
        let log = self.dir.path().join("log");
        let log_path = log.display().to_string();
        let out = self.run_on_data(
            "pg_ctl",
            &["-o", &options, "-l", &log_path, "-w", "-t", "60", "start"],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            lossy(&out),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops the server (fast: connections are cut).
    pub fn stop(&self) {
        let out = self.run_on_data("pg_ctl", &["-m", "fast", "-w", "stop"]);
        assert!(out.status.success(), "pg_ctl stop: {}", lossy(&out));
    }

    pub fn start_again(&self) {
        self.start_server();
    }

    /// A libpq connection string for it.
    pub fn url(&self) -> String {
        format!(
            "postgresql://eddy@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// Runs `sql` with psql; the rows, fields separated by `|`.
    pub fn query(&self, sql: &str) -> Vec<String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-At", "-F", "|", "-v", "ON_ERROR_STOP=1"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "eddy",
            ])
            .args(["-d", "postgres", "-c", sql])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "psql {sql}: {}", lossy(&out));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// One number from `sql`.
    pub fn count(&self, sql: &str) -> i64 {
        self.query(sql)[0].parse().unwrap()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn lossy(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.run_on_data("pg_ctl", &["-m", "immediate", "-w", "stop"]);
    }
}

//! `tessera logs` across generations: `--previous`, `--generation N`, `-f --follow-restarts`,
//! with the real binaries and the probe engine (which prints its generation when it starts).

use std::io::Read;
use std::process::{Command, Stdio};

use tessera_proto::v1 as pb;
use tessera_tests::deploy::{Cluster, probe, running_at, wait_for};
use tessera_tests::wait_until;

fn kill_rank0(d: &pb::Deployment) {
    let pid = d.ranks[0].pid as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill");
}

#[tokio::test]
async fn logs_of_earlier_generations_and_following_across_restarts() {
    let c = Cluster::start(&[]).await;
    let deps = c.client().await;
    deps.clone().create(probe("m", 2, 1)).await.expect("create");
    let d = wait_for(&deps, "m", "running", running_at(1)).await;
    let admin = c.head.data_dir.join("admin.token");
    let tessera = |args: &[&str]| {
        Command::new(tessera_tests::bin("tessera"))
            .args(["--head", &c.head.url])
            .args(args)
            .env("TESSERA_TOKEN_FILE", &admin)
            .output()
            .expect("run tessera")
    };
    let out = tessera(&["logs", "m", "--previous"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no earlier one"), "{out:?}");

    // Follow across restarts: one stream over generations 1 and 2.
    let mut follower = Command::new(tessera_tests::bin("tessera"))
        .args(["--head", &c.head.url, "logs", "m", "-f", "--follow-restarts"])
        .env("TESSERA_TOKEN_FILE", &admin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    kill_rank0(&d);
    let d2 = wait_for(&deps, "m", "generation 2", running_at(2)).await;

    // The previous generation's log, and generation 1 by number: its start line says so.
    let prev = tessera(&["logs", "m", "--previous"]);
    assert!(prev.status.success(), "{prev:?}");
    assert!(String::from_utf8_lossy(&prev.stdout).contains("starting (generation 1)"), "{prev:?}");
    let now = tessera(&["logs", "m"]);
    assert!(String::from_utf8_lossy(&now.stdout).contains("starting (generation 2)"), "{now:?}");
    let by_number = tessera(&["logs", "m", "--generation", "1"]);
    assert_eq!(by_number.stdout, prev.stdout);
    let gone = tessera(&["logs", "m", "--generation", "9"]);
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("not kept on this node"), "{gone:?}");

    // The follower saw generation 2 start; it ends when the deployment is deleted.
    let _ = d2;
    deps.clone().delete(pb::DeleteDeploymentRequest { name: "m".into() }).await.expect("delete");
    let status = wait_until("the follower ends", || {
        let s = follower.try_wait().expect("try_wait");
        async move { s }
    })
    .await;
    assert!(status.success());
    let mut stdout = String::new();
    follower.stdout.take().expect("stdout").read_to_string(&mut stdout).expect("read");
    let mut stderr = String::new();
    follower.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read");
    assert!(
        stdout.contains("starting (generation 1)") && stdout.contains("starting (generation 2)"),
        "{stdout}\n{stderr}"
    );
    assert!(stderr.contains("generation 1 ended; waiting for the next"), "{stderr}");
    assert!(stderr.contains("m was deleted"), "{stderr}");
}

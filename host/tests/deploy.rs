//! `docker-compose.yml` cannot run here (no Docker engine), so keep what it relies on true:
//! the host's config in it is valid, and it points at the services and files compose defines.

mod common;

#[test]
fn the_compose_host_config_is_valid_and_matches_the_compose_file() {
    let root = common::root();
    let compose = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    let text = std::fs::read_to_string(root.join("deploy/plugins.toml")).unwrap();
    let config = eddy::config::Config::parse(&text, &root.join("deploy/plugins.toml"))
        .expect("deploy/plugins.toml");

    // Mounted where the image's CMD reads it.
    assert!(compose.contains("./deploy:/etc/eddy:ro"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    assert!(dockerfile.contains(r#"CMD ["run", "--config", "/etc/eddy/plugins.toml"]"#));

    // Talks to the compose broker's internal listener, and serves metrics on the published port.
    assert!(compose.contains(&format!("INTERNAL://{}", config.kafka.brokers)));
    assert_eq!(config.http.address.port(), 9464);
    assert!(compose.contains("\"9464:9464\""));
    // State (and compiled plugins) must be writable and outlive the container: not under the
    // read-only config mount, and on a volume.
    let state = config.state.dir.display().to_string();
    assert!(
        config.state.dir.is_absolute() && !state.starts_with("/etc/eddy"),
        "state dir {state}"
    );
    assert!(
        compose.contains(&format!("eddy-data:{state}")),
        "a volume at {state}"
    );

    // Every plugin is one the image ships, and every topic it writes is created.
    for p in &config.plugins {
        let file = p.path.file_name().unwrap().to_str().unwrap();
        assert!(
            p.path.starts_with("/opt/eddy/plugins"),
            "{}",
            p.path.display()
        );
        let crate_name = file.trim_end_matches(".wasm").replace('_', "-");
        assert!(
            dockerfile.contains(&format!("-p {crate_name}")),
            "the image does not build {crate_name}"
        );
        assert!(
            compose.contains(&format!("{}:", p.dead_letter_topic())),
            "dead-letter topic of {}",
            p.name
        );
        for target in p.outputs.values() {
            if let eddy::config::OutputTarget::Topic(t) = target {
                assert!(
                    compose.contains(&format!("{t}:")),
                    "topic {t} is not created"
                );
            }
        }
    }
    assert!(
        compose.contains(&format!("{}:6", config.kafka.topic)),
        "input topic with 6 partitions"
    );
    // KRaft, not ZooKeeper.
    assert!(compose.contains("KAFKA_PROCESS_ROLES: broker,controller"));
    assert!(!compose.to_lowercase().contains("zookeeper:"));
}

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

/// deploy/scale-out/plugins.toml, which the three hosts of the compose profile `scale-out` run:
/// valid, sharing groups among themselves but none with the single host, and every file,
/// topic, volume and port it relies on is in the compose file and the image.
#[test]
fn the_scale_out_config_is_valid_and_matches_the_compose_file() {
    let root = common::root();
    let compose = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let path = root.join("deploy/scale-out/plugins.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let config = eddy::config::Config::parse(&text, &path).expect("deploy/scale-out/plugins.toml");
    let single = eddy::config::Config::parse(
        &std::fs::read_to_string(root.join("deploy/plugins.toml")).unwrap(),
        &root.join("deploy/plugins.toml"),
    )
    .unwrap();

    assert!(config.state.shared_group);
    assert!(compose.contains(r#"profiles: ["scale-out"]"#));
    // Read from the mounted deploy directory, by each host.
    assert!(
        compose.contains(r#"command: ["run", "--config", "/etc/eddy/scale-out/plugins.toml"]"#)
    );
    assert!(compose.contains(&format!("INTERNAL://{}", config.kafka.brokers)));
    // One port and one state volume per host.
    assert_eq!(config.http.address.port(), 9464);
    let state = config.state.dir.display().to_string();
    assert!(config.state.dir.is_absolute() && !state.starts_with("/etc/eddy"));
    for (host, port) in [("eddy-1", 9465), ("eddy-2", 9466), ("eddy-3", 9467)] {
        assert!(compose.contains(&format!("  {host}:")), "service {host}");
        assert!(
            compose.contains(&format!("\"{port}:9464\"")),
            "{host}'s port"
        );
        assert!(
            compose.contains(&format!("{host}-data:{state}")),
            "{host}'s volume"
        );
        assert!(
            compose.contains(&format!("  {host}-data:\n")),
            "{host}'s volume declared"
        );
    }
    // The single host runs beside them unless left out: it must not join their groups.
    for p in &config.plugins {
        assert!(
            single.plugins.iter().all(|q| q.group_id() != p.group_id()),
            "plugin {}: group {} is also the single host's",
            p.name,
            p.group_id()
        );
    }

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
        let input = p.input_topic(&config.kafka.topic);
        assert!(
            compose.contains(&format!("{input}:")),
            "input topic {input} is not created"
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
    // Two stages: analytics' partials are what the reducer reads, from a topic of one
    // partition.
    let plugin = |name: &str| config.plugins.iter().find(|p| p.name == name).unwrap();
    let analytics = plugin("analytics");
    let output = analytics.config["partials"].as_str().unwrap();
    let Some(eddy::config::OutputTarget::Topic(partials)) = analytics.outputs.get(output) else {
        panic!("analytics' `{output}` output is not a topic");
    };
    assert_eq!(plugin("reducer").topic.as_deref(), Some(partials.as_str()));
    assert!(compose.contains(&format!("{partials}:1 ")));
}

/// The compose files' plugins compile and take their `[plugin.config]`, with the `.wasm`
/// files built here in place of the image's.
#[test]
fn the_compose_configs_pass_check_with_the_plugins_built_here() {
    let root = common::root();
    for file in ["deploy/plugins.toml", "deploy/scale-out/plugins.toml"] {
        let path = root.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut config = eddy::config::Config::parse(&text, &path).expect(file);
        for p in &mut config.plugins {
            let stem = p.path.file_stem().unwrap().to_str().unwrap().to_string();
            p.path = common::wasm(&stem).into();
        }
        eddy::check_plugins(&config).unwrap_or_else(|e| panic!("{file}: {e:#}"));
    }
}

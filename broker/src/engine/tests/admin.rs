//! An operator's release and license reload.

use super::*;

/// Steps: an operator releases one agent, then all of a slave's seats; the seats are free
/// at once, the slave is sent a logout naming the agents, an alert goes out, and a slave
/// that missed the logout cannot take the agents back at its next hello.
#[test]
fn admin_release_logs_out_and_revokes() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    for a in ["a1", "a2", "a3"] {
        assert!(approved(&h.decision("s1", a, "inbound")));
    }
    let Released { reply, effects, .. } = h.admin_release(&lmbus_schemas::ReleaseRequest {
        slave_id: "s1".into(),
        agent_id: Some("a1".into()),
        operator: "alice".into(),
    });
    assert_eq!(
        reply,
        lmbus_schemas::ReleaseReply::Released {
            agents: vec!["a1".into()]
        }
    );
    assert!(effects.iter().any(|e| matches!(e,
        Effect::Control { message: ControlMessage::LogOut { agents }, .. }
            if agents.len() == 1 && agents[0].reason == RejectReason::ReleasedByAdmin)));
    assert!(effects.iter().any(|e| matches!(e,
        Effect::Alert(a) if a.kind == AlertKind::SeatsReleased && a.message.contains("alice"))));
    assert_eq!(h.engine.total_in_use(), 2);

    let Released { reply, .. } = h.admin_release(&lmbus_schemas::ReleaseRequest {
        slave_id: "s1".into(),
        agent_id: None,
        operator: String::new(),
    });
    assert!(
        matches!(reply, lmbus_schemas::ReleaseReply::Released { ref agents } if agents.len() == 2)
    );
    assert_eq!(h.engine.total_in_use(), 0);

    // The slave missed the logouts and claims all three again.
    let claims = ["a1", "a2", "a3"]
        .map(|a| AgentClaim {
            agent_id: a.into(),
            agent_type: "inbound".into(),
        })
        .to_vec();
    let out = h.hello_with("s1", None, claims);
    let Some(Reply::Welcome(w)) = reply_of(&out) else {
        panic!()
    };
    assert_eq!(w.rejected_agents.len(), 3);
    assert!(
        w.rejected_agents
            .iter()
            .all(|r| r.reason == RejectReason::ReleasedByAdmin)
    );
    assert_eq!(h.engine.total_in_use(), 0);
    // Registering anew is a visible, normal registration.
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    // a4 is released, then registered anew before the slave's next hello: that seat is
    // rightly held, and the hello keeps it.
    assert!(approved(&h.decision("s1", "a4", "outbound")));
    h.admin_release(&lmbus_schemas::ReleaseRequest {
        slave_id: "s1".into(),
        agent_id: Some("a4".into()),
        operator: "alice".into(),
    });
    assert!(approved(&h.decision("s1", "a4", "outbound")));
    let claims = [("a1", "inbound"), ("a4", "outbound")]
        .map(|(a, t)| AgentClaim {
            agent_id: a.into(),
            agent_type: t.into(),
        })
        .to_vec();
    let out = h.hello_with("s1", None, claims);
    let Some(Reply::Welcome(w)) = reply_of(&out) else {
        panic!()
    };
    assert!(w.rejected_agents.is_empty(), "{:?}", w.rejected_agents);
    assert_eq!(h.engine.total_in_use(), 2);

    let Released { reply, effects, .. } = h.admin_release(&lmbus_schemas::ReleaseRequest {
        slave_id: "nobody".into(),
        agent_id: None,
        operator: String::new(),
    });
    assert!(matches!(reply, lmbus_schemas::ReleaseReply::Error { .. }));
    assert!(effects.is_empty());
}

/// Reloading a master license with a lower limit logs nobody out but rejects new
/// registrations until usage is below it; the change is one ledger record that a standby
/// and a snapshot carry; a tampered or non-master file changes nothing and the error names
/// the file; the same license reloaded again says "nothing changed" and records nothing.
#[test]
fn a_reloaded_license_lowers_the_limit_without_logging_anyone_out() {
    let mut h = Harness::new(true);
    let mut standby = Engine::new(config(true));
    let mut changes = Vec::new();
    changes.extend(h.hello_with("s1", None, vec![]).changes);
    for a in ["a1", "a2", "a3"] {
        let out = h.register("s1", a, "inbound");
        assert!(approved(&decision_of(&out)));
        changes.extend(out.changes);
    }
    let lower = sign_license(
        &license(
            Role::Master,
            Limits {
                total: Some(2),
                local: None,
                agent_types: BTreeMap::new(),
            },
        ),
        &vendor(),
    )
    .unwrap();
    let reload = |text: &str| lmbus_schemas::ReloadRequest {
        license: text.to_owned(),
        operator: "ops".into(),
        file: "/etc/lmbus/new.lic".into(),
    };
    // Refused: tampered, or a slave license. Nothing changes; the error names the file.
    let tampered = lower.replace("total = 2", "total = 200");
    for bad in [tampered.as_str(), slave_license(None).as_str()] {
        let (reply, out) = h.reload_license(&reload(bad), TODAY);
        let lmbus_schemas::ReloadReply::Error { message } = reply else {
            panic!("{reply:?}");
        };
        assert!(message.contains("/etc/lmbus/new.lic"), "{message}");
        assert!(out.changes.is_empty());
    }
    assert_eq!(h.engine.status(h.now).total_limit, 5);

    let (reply, out) = h.reload_license(&reload(&lower), TODAY);
    let lmbus_schemas::ReloadReply::Reloaded { message } = reply else {
        panic!("{reply:?}");
    };
    assert!(message.contains("nobody is logged out"), "{message}");
    assert_eq!(alerts(&out)[0].kind, AlertKind::LicenseReloaded);
    assert_eq!(out.changes.len(), 1, "{:?}", out.changes);
    changes.extend(out.changes);
    // The same license again: nothing changed, nothing recorded, nobody alerted.
    let (reply, out) = h.reload_license(&reload(&lower), TODAY);
    let lmbus_schemas::ReloadReply::Reloaded { message } = reply else {
        panic!("{reply:?}");
    };
    assert!(message.starts_with("nothing changed:"), "{message}");
    assert!(out.changes.is_empty(), "{:?}", out.changes);
    assert!(alerts(&out).is_empty());
    assert_eq!(h.engine.total_in_use(), 3);
    assert_eq!(
        rejected_for(&h.decision("s1", "a4", "inbound")),
        Some(RejectReason::AggregateLimit)
    );
    let out = h.unregister_out("s1", "a1");
    changes.extend(out.changes);
    let out = h.unregister_out("s1", "a2");
    changes.extend(out.changes);
    let out = h.register("s1", "a4", "inbound");
    assert!(approved(&decision_of(&out)));
    changes.extend(out.changes);
    assert_eq!(
        rejected_for(&h.decision("s1", "a5", "inbound")),
        Some(RejectReason::AggregateLimit)
    );
    // A standby that applied the records, and an engine restored from its snapshot, use
    // the new limit too.
    for change in &changes {
        standby.apply(h.now, change).unwrap();
    }
    let mut restored = Engine::new(config(true));
    for change in standby.snapshot(100) {
        restored.apply(h.now, &change).unwrap();
    }
    for engine in [&standby, &restored] {
        assert_eq!(engine.status(h.now).total_limit, 2);
        assert_eq!(engine.total_in_use(), 2);
    }
}

/// Steps: a slave is granted agents out of id order, an operator releases them all, and
/// the engine is snapshotted; the release reply, the logout and the snapshot's `Revoke`s
/// name the agents in id order, whatever order they were granted in (no hash order).
#[test]
fn released_and_snapshotted_agents_come_in_id_order() {
    let mut h = Harness::new(true);
    h.hello("s1", None);
    for (a, agent_type) in [
        ("c", "inbound"),
        ("a", "outbound"),
        ("d", "inbound"),
        ("b", "outbound"),
    ] {
        assert!(approved(&h.decision("s1", a, agent_type)));
    }
    let out = h.admin_release(&lmbus_schemas::ReleaseRequest {
        slave_id: "s1".into(),
        agent_id: None,
        operator: "alice".into(),
    });
    let sorted: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
    assert_eq!(
        out.reply,
        lmbus_schemas::ReleaseReply::Released {
            agents: sorted.clone()
        }
    );
    let logged_out: Vec<String> = out
        .effects
        .iter()
        .find_map(|e| match e {
            Effect::Control {
                message: ControlMessage::LogOut { agents },
                ..
            } => Some(agents.iter().map(|a| a.agent_id.clone()).collect()),
            _ => None,
        })
        .unwrap();
    assert_eq!(logged_out, sorted);
    let revoked: Vec<String> = h
        .engine
        .snapshot(3)
        .into_iter()
        .filter_map(|c| match c {
            SeatChange::Revoke { agents, .. } => Some(agents),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(revoked, sorted);
}

/// Steps: the license in force (issued 2026-01-01) is reloaded with older issues of the
/// same id carrying more seats: one issued a month earlier, and (after a same-day
/// revision 2 is in force) the same day's revision 1 and unrevised issue: each refused
/// with a `license_refused` alert, the limit unchanged, nothing recorded. A later issue,
/// or a later revision the same day, is in force at once. Catches: a site going back to
/// an older license file with more seats (or without an offline limit) than the vendor's
/// latest.
#[test]
fn an_older_issue_of_the_license_in_force_is_refused() {
    let mut h = Harness::new(true);
    let current = h.engine.cfg.license.clone();
    let issue = |issued: Date, revision: Option<u32>, total: u32| {
        let mut l = current.clone();
        l.issued = issued;
        l.revision = revision;
        l.limits.total = Some(total);
        sign_license(&l, &vendor()).unwrap()
    };
    let reload = |text: String| lmbus_schemas::ReloadRequest {
        license: text,
        operator: "ops".into(),
        file: "old.lic".into(),
    };
    let refused = |h: &mut Harness, text: String| {
        let (reply, out) = h.reload_license(&reload(text), TODAY);
        let lmbus_schemas::ReloadReply::Error { message } = reply else {
            panic!("{reply:?}");
        };
        assert!(message.contains("an older issue"), "{message}");
        assert!(out.changes.is_empty());
        assert_eq!(alerts(&out)[0].kind, AlertKind::LicenseRefused);
    };
    refused(&mut h, issue(date!(2025 - 12 - 01), None, 50));
    assert_eq!(h.engine.status(h.now).total_limit, 5);
    let (reply, out) = h.reload_license(&reload(issue(current.issued, Some(2), 4)), TODAY);
    assert!(
        matches!(reply, lmbus_schemas::ReloadReply::Reloaded { .. }),
        "{reply:?}"
    );
    assert_eq!(out.changes.len(), 1);
    assert_eq!(h.engine.status(h.now).total_limit, 4);
    refused(&mut h, issue(current.issued, Some(1), 50));
    refused(&mut h, issue(current.issued, None, 50));
    assert_eq!(h.engine.status(h.now).total_limit, 4);
    let (reply, _) = h.reload_license(&reload(issue(date!(2026 - 02 - 01), None, 3)), TODAY);
    assert!(
        matches!(reply, lmbus_schemas::ReloadReply::Reloaded { .. }),
        "{reply:?}"
    );
    assert_eq!(h.engine.status(h.now).total_limit, 3);
}

/// Another license (another id) issued before the one in force, say an older contract's
/// with more seats and no offline limit, is refused; one of another id issued the same day
/// or later (a new contract) is taken.
#[test]
fn another_license_issued_before_the_one_in_force_is_refused() {
    let mut h = Harness::new(true);
    let current = h.engine.cfg.license.clone();
    let other = |issued: Date, total: u32| {
        let mut l = current.clone();
        l.id = Uuid::new_v4();
        l.issued = issued;
        l.limits.total = Some(total);
        l.sync_within_days = None;
        sign_license(&l, &vendor()).unwrap()
    };
    let reload = |text: String| lmbus_schemas::ReloadRequest {
        license: text,
        operator: "ops".into(),
        file: "contract.lic".into(),
    };
    let earlier = current.issued.previous_day().unwrap();
    let (reply, out) = h.reload_license(&reload(other(earlier, 500)), TODAY);
    let lmbus_schemas::ReloadReply::Error { message } = reply else {
        panic!("{reply:?}");
    };
    assert!(
        message.contains("was issued before the license in force"),
        "{message}"
    );
    assert!(out.changes.is_empty());
    assert_eq!(alerts(&out)[0].kind, AlertKind::LicenseRefused);
    assert_eq!(h.engine.status(h.now).total_limit, 5);
    let (reply, _) = h.reload_license(&reload(other(current.issued, 6)), TODAY);
    assert!(
        matches!(reply, lmbus_schemas::ReloadReply::Reloaded { .. }),
        "{reply:?}"
    );
    assert_eq!(h.engine.status(h.now).total_limit, 6);
}

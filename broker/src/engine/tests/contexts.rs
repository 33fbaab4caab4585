//! License contexts: a master serves only slaves of its own context (licensed or declared),
//! says its context in every alert and in its status, refuses a reload of another context,
//! and refuses to apply a ledger written in another context.

use super::*;

/// A harness whose master license is of `context`.
fn master_in(context: Context, allow_unlicensed: bool) -> Harness {
    let mut h = Harness::new(allow_unlicensed);
    h.engine.cfg.license.context = context;
    h
}

/// A signed slave license of `context`.
fn slave_license_in(context: Context) -> String {
    let mut l = license(Role::Slave, Limits::default());
    l.context = context;
    sign_license(&l, &vendor()).unwrap()
}

/// A hello as the slave sends it, declaring `declared`.
fn hello_declaring(
    h: &mut Harness,
    slave: &str,
    license: Option<String>,
    declared: Option<Context>,
) -> Output {
    let seq = h.next_seq();
    h.engine.handle(
        h.now,
        Event::Hello {
            slave: id(slave),
            hello: Hello {
                instance: Uuid::new_v4(),
                license,
                heartbeat_interval_ms: 1000,
                seq,
                grace_ms: 60_000,
                logout_after_grace: true,
                request_timeout_ms: 2000,
                context: declared,
                ..Default::default()
            },
            today: TODAY,
        },
    )
}

/// Asserts that `out` refused the slave for a context mismatch, in the reply and in one
/// `slave_refused` alert marked with the master's context, and recorded nothing. Returns
/// the refusal's detail.
fn refused_for_context(out: &Output, master: Context) -> String {
    let detail = match reply_of(out) {
        Some(Reply::Refused {
            reason: RejectReason::ContextMismatch,
            detail,
            ..
        }) => detail,
        other => panic!("expected a context_mismatch refusal, got {other:?}"),
    };
    let alerts = alerts(out);
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].kind, AlertKind::SlaveRefused);
    assert_eq!(alerts[0].reason, Some(RejectReason::ContextMismatch));
    assert_eq!(alerts[0].context, master.token());
    assert_eq!(alerts[0].not_for_production, master.not_for_production());
    assert!(alerts[0].message.contains(&detail), "{}", alerts[0].message);
    assert!(out.changes.is_empty(), "{:?}", out.changes);
    detail
}

/// Every master context against every slave license context: the same context is
/// welcome, and a production slave at a backup master (the production slaves are whom a
/// backup serves); each other direction (production master / development slave,
/// development master / production slave, production master / backup slave, …) is
/// refused, with a detail naming both contexts, and the refused slave cannot register.
#[test]
fn a_slave_license_of_another_context_is_refused_in_every_direction() {
    for master in Context::ALL {
        for slave in Context::ALL {
            let mut h = master_in(master, false);
            let out = hello_declaring(&mut h, "s1", Some(slave_license_in(slave)), None);
            if master == slave || (master == Context::Backup && slave == Context::Production) {
                assert!(
                    matches!(reply_of(&out), Some(Reply::Welcome(_))),
                    "{master} master, {slave} slave: {:?}",
                    out.reply
                );
                assert!(approved(&h.decision("s1", "a1", "inbound")));
                continue;
            }
            let detail = refused_for_context(&out, master);
            assert!(
                detail.contains(&format!("for context '{slave}'"))
                    && detail.contains(&format!("this master's is '{master}'")),
                "{detail}"
            );
            assert_eq!(
                rejected_for(&h.decision("s1", "a1", "inbound")),
                Some(RejectReason::SlaveNotConnected),
                "{master} master, {slave} slave"
            );
        }
    }
}

/// An unlicensed slave runs in the context it declares, production when it says nothing
/// (a slave of an older build); a declared context other than the master's is refused even
/// where unlicensed slaves are allowed, and the detail says which flag to set.
#[test]
fn an_unlicensed_slave_is_admitted_only_in_the_masters_context() {
    for master in Context::ALL {
        for declared in [
            None,
            Some(Context::Production),
            Some(Context::Backup),
            Some(Context::Development),
        ] {
            let mut h = master_in(master, true);
            let out = hello_declaring(&mut h, "u1", None, declared);
            let declared_or_production = declared.unwrap_or(Context::Production);
            if declared_or_production == master
                || (master == Context::Backup && declared_or_production == Context::Production)
            {
                assert!(
                    matches!(reply_of(&out), Some(Reply::Welcome(_))),
                    "{master} master, declared {declared:?}: {:?}",
                    out.reply
                );
                continue;
            }
            let detail = refused_for_context(&out, master);
            assert!(detail.contains(&format!("--context {master}")), "{detail}");
        }
    }
    // In the right context, the permission rule still applies.
    let mut h = master_in(Context::Development, false);
    let out = hello_declaring(&mut h, "u1", None, Some(Context::Development));
    assert!(matches!(
        reply_of(&out),
        Some(Reply::Refused {
            reason: RejectReason::UnlicensedNotAllowed,
            ..
        })
    ));
}

/// A licensed slave that declares a context other than its license's is refused, even
/// when the license matches the master.
#[test]
fn a_declared_context_must_be_the_slave_licenses() {
    let mut h = master_in(Context::Production, false);
    let out = hello_declaring(
        &mut h,
        "s1",
        Some(slave_license_in(Context::Production)),
        Some(Context::Development),
    );
    let detail = refused_for_context(&out, Context::Production);
    assert!(
        detail.contains("declares context 'development'"),
        "{detail}"
    );
    let out = hello_declaring(
        &mut h,
        "s1",
        Some(slave_license_in(Context::Production)),
        Some(Context::Production),
    );
    assert!(matches!(reply_of(&out), Some(Reply::Welcome(_))));
}

/// A development master marks its status and every alert it raises as not for production
/// use; a production or backup one says its context and is not marked.
#[test]
fn a_development_master_marks_its_status_and_alerts() {
    for master in Context::ALL {
        let mut h = master_in(master, true);
        let status = h.engine.status(h.now);
        assert_eq!(status.license.context, master.token());
        assert_eq!(
            status.license.not_for_production,
            master == Context::Development
        );
        let out = hello_declaring(&mut h, "u1", None, Some(master));
        let connected = alerts(&out);
        assert!(!connected.is_empty(), "{out:?}");
        for alert in connected {
            assert_eq!(alert.context, master.token(), "{alert:?}");
            assert_eq!(alert.not_for_production, master == Context::Development);
        }
    }
}

/// `admin reload-license` with a master license of another context is refused with a
/// clear error and a `license_refused` alert; the license in force, the ledger and the
/// connected slaves are untouched. The same context still reloads.
#[test]
fn a_reload_of_another_context_is_refused() {
    let mut h = master_in(Context::Development, true);
    assert!(matches!(
        reply_of(&hello_declaring(
            &mut h,
            "u1",
            None,
            Some(Context::Development)
        )),
        Some(Reply::Welcome(_))
    ));
    let before = h.engine.config().license.clone();
    let reload = |context: Context, total: u32| {
        let mut l = license(
            Role::Master,
            Limits {
                total: Some(total),
                ..Limits::default()
            },
        );
        l.context = context;
        if context == Context::Backup {
            l.backs = Some(Uuid::new_v4());
        }
        lmbus_schemas::ReloadRequest {
            license: sign_license(&l, &vendor()).unwrap(),
            operator: "ops".into(),
            file: "/etc/lmbus/prod.lic".into(),
        }
    };
    for other in [Context::Production, Context::Backup] {
        let (reply, out) = h.reload_license(&reload(other, 9), TODAY);
        let lmbus_schemas::ReloadReply::Error { message } = reply else {
            panic!("{reply:?}");
        };
        assert!(
            message.contains(&format!("is for context '{other}'"))
                && message.contains("this master runs in 'development'")
                && message.contains("/etc/lmbus/prod.lic")
                && message.contains("current license stays in force"),
            "{message}"
        );
        assert!(out.changes.is_empty(), "{:?}", out.changes);
        let alerts = alerts(&out);
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].kind, AlertKind::LicenseRefused);
        assert_eq!(alerts[0].severity, Severity::Warning);
        assert!(alerts[0].not_for_production);
        assert!(
            alerts[0].message.contains("ops tried to reload"),
            "{}",
            alerts[0].message
        );
        assert_eq!(h.engine.config().license, before);
        assert_eq!(h.engine.status(h.now).total_limit, 5);
    }
    let (reply, out) = h.reload_license(&reload(Context::Development, 9), TODAY);
    assert!(
        matches!(reply, lmbus_schemas::ReloadReply::Reloaded { .. }),
        "{reply:?}"
    );
    assert_eq!(out.changes.len(), 1);
    assert_eq!(h.engine.status(h.now).total_limit, 9);
}

/// A backup master reloads a backup license that backs the same production license on the
/// same production cluster (new limits), but refuses one that backs another production
/// license or names another production cluster (its watch was set at start), with the
/// reason and a `license_refused` alert; the license in force stays.
#[test]
fn a_backup_reload_that_backs_something_else_is_refused() {
    let mut h = master_in(Context::Backup, true);
    let backs = Uuid::new_v4();
    h.engine.cfg.license.backs = Some(backs);
    h.engine.cfg.license.production_cluster = Some("prod".into());
    let before = h.engine.config().license.clone();
    let reload = |backs: Uuid, cluster: &str, total: u32| {
        let mut l = license(
            Role::Master,
            Limits {
                total: Some(total),
                ..Limits::default()
            },
        );
        l.id = before.id;
        l.context = Context::Backup;
        l.backs = Some(backs);
        l.production_cluster = Some(cluster.into());
        lmbus_schemas::ReloadRequest {
            license: sign_license(&l, &vendor()).unwrap(),
            operator: "ops".into(),
            file: "/etc/lmbus/dr.lic".into(),
        }
    };
    for (other_backs, cluster) in [(Uuid::new_v4(), "prod"), (backs, "prod2")] {
        let (reply, out) = h.reload_license(&reload(other_backs, cluster, 9), TODAY);
        let lmbus_schemas::ReloadReply::Error { message } = reply else {
            panic!("{reply:?}");
        };
        assert!(
            message.contains(&format!(
                "backs production license {other_backs} of production cluster {cluster}"
            )) && message.contains("Restart it")
                && message.contains("current license stays in force"),
            "{message}"
        );
        assert!(out.changes.is_empty());
        assert_eq!(alerts(&out)[0].kind, AlertKind::LicenseRefused);
        assert_eq!(h.engine.config().license, before);
    }
    let (reply, out) = h.reload_license(&reload(backs, "prod", 9), TODAY);
    assert!(
        matches!(reply, lmbus_schemas::ReloadReply::Reloaded { .. }),
        "{reply:?}"
    );
    assert_eq!(out.changes.len(), 1);
    assert_eq!(h.engine.status(h.now).total_limit, 9);
}

/// A replica applies only a ledger of its own context: a `Leader` record or a `License`
/// record of another context is refused with `ReplayError::Context` (and changes nothing);
/// one from an older leader, which names no context, is applied.
#[test]
fn a_ledger_of_another_context_is_refused() {
    let mut e = Engine::new(config(true));
    let now = Instant::now();
    let leader = |context| SeatChange::Leader {
        replica: "b9".into(),
        term: 1,
        context,
    };
    assert_eq!(e.apply(now, &leader(None)), Ok(()));
    assert_eq!(e.apply(now, &leader(Some(Context::Production))), Ok(()));
    let refused = e.apply(now, &leader(Some(Context::Development)));
    assert_eq!(
        refused,
        Err(ReplayError::Context {
            ledger: Context::Development,
            mine: Context::Production,
        })
    );
    let text = refused.unwrap_err().to_string();
    assert!(
        text.contains("ledger is in context 'development'")
            && text.contains("license is for 'production'"),
        "{text}"
    );
    let before = e.config().license.clone();
    let mut backup = license(Role::Master, master_limits());
    backup.context = Context::Backup;
    backup.backs = Some(Uuid::new_v4());
    let record = SeatChange::License {
        text: sign_license(&backup, &vendor()).unwrap(),
    };
    assert_eq!(
        e.apply(now, &record),
        Err(ReplayError::Context {
            ledger: Context::Backup,
            mine: Context::Production,
        })
    );
    assert_eq!(e.config().license, before);
}

/// A backup master serves only while the runtime says production cannot: told production
/// is available, it refuses a hello and a registration `production_available` (with a
/// `slave_refused` alert for the hello), naming what it heard; told production runs
/// another license, it refuses `context_mismatch`; told nothing, it serves. A production
/// master ignores what it is told (it is nobody's backup).
#[test]
fn a_backup_master_serves_only_while_production_is_silent() {
    let mut h = master_in(Context::Backup, true);
    let heard = "production cluster prod's leader b1 beat 100ms ago".to_owned();
    h.engine.set_production_alive(
        Some((RejectReason::ProductionAvailable, heard.clone())),
        false,
    );
    let out = hello_declaring(&mut h, "s1", None, Some(Context::Production));
    match reply_of(&out) {
        Some(Reply::Refused { reason, detail, .. }) => {
            assert_eq!(reason, RejectReason::ProductionAvailable);
            assert!(detail.contains(&heard), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(alerts(&out)[0].kind, AlertKind::SlaveRefused);
    assert_eq!(alerts(&out)[0].context, "backup");

    h.engine.set_production_alive(None, false);
    let out = hello_declaring(&mut h, "s1", None, Some(Context::Production));
    assert!(matches!(reply_of(&out), Some(Reply::Welcome(_))), "{out:?}");
    assert!(approved(&h.decision("s1", "a1", "inbound")));

    h.engine.set_production_alive(
        Some((RejectReason::ProductionAvailable, heard.clone())),
        false,
    );
    assert_eq!(
        rejected_for(&h.decision("s1", "a2", "inbound")),
        Some(RejectReason::ProductionAvailable)
    );
    h.engine.set_production_alive(
        Some((
            RejectReason::ContextMismatch,
            "production runs another license".into(),
        )),
        false,
    );
    assert_eq!(
        rejected_for(&h.decision("s1", "a2", "inbound")),
        Some(RejectReason::ContextMismatch)
    );
    assert_eq!(h.engine.seats()["s1"].len(), 1, "a1 keeps its seat");

    let mut prod = master_in(Context::Production, true);
    prod.engine
        .set_production_alive(Some((RejectReason::ProductionAvailable, heard)), false);
    let out = hello_declaring(&mut prod, "s1", None, None);
    assert!(matches!(reply_of(&out), Some(Reply::Welcome(_))), "{out:?}");
}

/// The handback: a backup master holding seats is told production has been available for
/// the whole handback window; its next tick releases every seat (recorded as `Revoke`),
/// tells each slave to log those agents out with `production_available`, alerts
/// `seats_released`, and a hello claiming them again is refused them. Before the window has
/// passed, nothing is released.
#[test]
fn a_backup_master_hands_back_once_the_window_has_passed() {
    let mut h = master_in(Context::Backup, true);
    hello_declaring(&mut h, "s1", None, Some(Context::Production));
    assert!(approved(&h.decision("s1", "a1", "inbound")));
    assert!(approved(&h.decision("s1", "a2", "inbound")));
    let heard = (RejectReason::ProductionAvailable, "p1 beat".to_owned());
    h.engine.set_production_alive(Some(heard.clone()), false);
    let out = h.engine.handle(h.now, Event::Tick { today: TODAY });
    assert_eq!(h.engine.seats()["s1"].len(), 2, "{out:?}");
    h.engine.set_production_alive(Some(heard), true);
    let out = h.engine.handle(h.now, Event::Tick { today: TODAY });
    assert!(h.engine.seats().get("s1").is_none_or(|s| s.is_empty()));
    assert!(
        out.changes
            .iter()
            .any(|c| matches!(c, SeatChange::Revoke { slave, agents } if slave == "s1" && agents.len() == 2)),
        "{:?}",
        out.changes
    );
    let logout = out.effects.iter().find_map(|e| match e {
        Effect::Control {
            message: ControlMessage::LogOut { agents },
            ..
        } => Some(agents.clone()),
        _ => None,
    });
    let logout = logout.expect("a logout");
    assert_eq!(logout.len(), 2);
    assert!(
        logout
            .iter()
            .all(|a| a.reason == RejectReason::ProductionAvailable)
    );
    let released = alerts(&out);
    assert!(
        released
            .iter()
            .any(|a| a.kind == AlertKind::SeatsReleased && a.message.contains("handback")),
        "{released:?}"
    );
    assert_eq!(h.engine.status(h.now).total_in_use, 0);
}

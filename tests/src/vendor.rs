//! The vendor's side in tests: a key pair in a temp dir and the license files it signs,
//! and a unique cluster name per test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use lmbus_schemas::{
    Context, License, Limits, Role, VendorKey, VerifyingKey, public_key_text, sign_license,
};
use time::macros::date;

/// A vendor key pair in a temp dir, with helpers to issue license files.
#[derive(Debug)]
pub struct Vendor {
    key: VendorKey,
    dir: tempfile::TempDir,
}

impl Vendor {
    pub fn new() -> anyhow::Result<Self> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).context("no randomness for a vendor key")?;
        let vendor = Self {
            key: VendorKey::from_bytes(&seed),
            dir: tempfile::tempdir()?,
        };
        std::fs::write(
            vendor.public_key_path(),
            public_key_text(&vendor.key.verifying_key()),
        )?;
        Ok(vendor)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn public_key_path(&self) -> PathBuf {
        self.dir.path().join("vendor.pub")
    }

    /// The vendor's secret key as a file (`lmbus-vendor` signs sync answers with it),
    /// written on first use.
    pub fn secret_key_path(&self) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join("vendor.key");
        if !path.exists() {
            std::fs::write(&path, lmbus_schemas::secret_key_text(&self.key))?;
        }
        Ok(path)
    }

    /// Signs a vendor sync answer as the vendor.
    pub fn sign_sync(
        &self,
        answer: &lmbus_schemas::SyncAnswer,
    ) -> anyhow::Result<lmbus_schemas::SignedSyncAnswer> {
        Ok(lmbus_schemas::sign_sync_answer(answer, &self.key)?)
    }

    /// A license valid from 2026-01-01 to 2099-12-31.
    pub fn license(role: Role, limits: Limits) -> License {
        License {
            id: uuid::Uuid::new_v4(),
            customer: "Test Customer".into(),
            issued: date!(2026 - 01 - 01),
            expires: date!(2099 - 12 - 31),
            maintenance_expires: date!(2099 - 12 - 31),
            role,
            context: Context::Production,
            sync_within_days: None,
            revision: None,
            backs: None,
            production_cluster: None,
            limits,
        }
    }

    /// Signs `license` into `<dir>/<name>` and returns the path.
    pub fn write(&self, name: &str, license: &License) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, sign_license(license, &self.key)?)?;
        Ok(path)
    }

    /// A master license with `total` seats and the given type limits.
    pub fn master(&self, total: u32, types: &[(&str, u32)]) -> anyhow::Result<PathBuf> {
        let limits = Limits {
            total: Some(total),
            local: None,
            agent_types: types
                .iter()
                .map(|(t, n)| ((*t).to_owned(), *n))
                .collect::<BTreeMap<_, _>>(),
        };
        self.write(
            &format!("master-{}.lic", uuid::Uuid::new_v4().simple()),
            &Self::license(Role::Master, limits),
        )
    }

    /// A slave license with an optional local limit.
    pub fn slave(&self, local: Option<u32>) -> anyhow::Result<PathBuf> {
        let limits = Limits {
            local,
            ..Limits::default()
        };
        self.write(
            &format!("slave-{}.lic", uuid::Uuid::new_v4().simple()),
            &Self::license(Role::Slave, limits),
        )
    }

    pub fn license_file(path: &Path) -> anyhow::Result<lmbus_slave::LicenseFile> {
        Ok(lmbus_slave::LicenseFile {
            name: path.display().to_string(),
            text: std::fs::read_to_string(path)?,
        })
    }
}

/// A unique cluster name per test, so tests never see each other's traffic.
pub fn cluster_name() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

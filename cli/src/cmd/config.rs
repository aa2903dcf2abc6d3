//! `bulksend config check`: load, validate and print the effective configuration.

use std::path::Path;

use bulksend_engine::classify::Classifier;
use bulksend_engine::smtp::ClientSettings;

use crate::app;

pub(crate) fn check(config: Option<&Path>) -> anyhow::Result<i32> {
    let settings = app::settings(config)?;
    // Also build what start-up would build from it, so its errors show here too.
    Classifier::new(&settings.classify.rules)?;
    ClientSettings::from_config(&settings.smtp)?;
    println!("{}", toml::to_string_pretty(&*settings)?);
    eprintln!(
        "config OK ({})",
        config.map_or(
            "no file; defaults and BULKSEND_* environment".to_owned(),
            |p| p.display().to_string()
        )
    );
    Ok(0)
}

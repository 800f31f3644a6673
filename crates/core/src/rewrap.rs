//! The rewrap use case: move every active version's data key under the current KEK.
//!
//! A rewrap re-wraps only the data key ([`envelope::rewrap`]); the value layer is never
//! decrypted. It runs online, beside servers that keep serving:
//!
//! * **Batched**: versions come from [`Store::versions_for_rewrap`] with
//!   [`KekFilter::Not`]`(target)`, one page at a time, in a stable order.
//! * **Compare-and-swap**: each new wrapped key is stored with
//!   [`Store::replace_wrapped_key`], which only replaces it if the version is still active and
//!   still under the KEK it was read with. A version destroyed or rewrapped meanwhile is
//!   *skipped* (counted), never clobbered.
//! * **Resumable**: after every batch the cursor is saved in provider state under
//!   [`CURSOR_KEY`] together with the target KEK, so a run killed at any point continues
//!   where the last finished batch ended. Everything before that point is already under the
//!   target and no longer matches the filter, so redoing a half-finished batch is harmless
//!   (idempotent). When a run reaches the end it clears the cursor; the next run scans from the
//!   start again (finding nothing, or versions a stale node wrote meanwhile).
//! * **Throttled**: at most [`RewrapOptions::max_per_second`] versions per second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use strongroom_crypto::envelope::{self, Algorithm};
use strongroom_crypto::{EnvelopeError, KeyProvider, ProviderErrorKind, Sealed, WrappedKey};
use strongroom_store::{Cursor, KekFilter, KekRef, RewrapItem, Store};
use tokio::task::JoinSet;

use crate::CoreError;

/// The provider-state key holding a rewrap's resume point.
pub const CURSOR_KEY: &str = "rewrap/cursor";

/// How a rewrap runs.
#[derive(Clone, Debug)]
pub struct RewrapOptions {
    /// Versions per batch (the store clamps it to 1000).
    pub batch_size: u32,
    /// At most this many versions per second (`None`: as fast as it goes).
    pub max_per_second: Option<u32>,
    /// Only count (and check that each data key unwraps); change nothing, save no cursor.
    pub dry_run: bool,
    /// Data keys re-wrapped at once (matters for remote providers, one round trip each).
    pub concurrency: usize,
}

impl Default for RewrapOptions {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            max_per_second: None,
            dry_run: false,
            concurrency: 64,
        }
    }
}

/// Counts so far (handed to the progress callback after every batch) and at the end.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RewrapReport {
    /// The KEK everything moves to (`provider:key_id:vN`).
    pub target: String,
    /// Versions not under the target when the run started (an estimate: writes go on).
    pub total: u64,
    /// Versions looked at.
    pub seen: u64,
    /// Versions now under the target (in a dry run: that would be).
    pub rewrapped: u64,
    /// Versions destroyed or rewrapped by someone else meanwhile: left alone.
    pub skipped: u64,
    /// Versions whose data key did not unwrap (wrong or retired KEK, tampered): left alone.
    pub failed: u64,
    /// Whether this run continued a previous, interrupted one.
    pub resumed: bool,
    /// Which versions did not unwrap: the first [`MAX_FAILURES_LISTED`] (`failed` counts
    /// them all). Names only, never a key or value.
    pub failures: Vec<FailedVersion>,
}

/// How many of the versions that did not unwrap a [`RewrapReport`] names.
pub const MAX_FAILURES_LISTED: usize = 20;

/// A version whose data key did not unwrap (none of it is secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FailedVersion {
    /// The owner.
    pub owner: String,
    /// The credential name.
    pub name: String,
    /// The version number.
    pub version: u32,
    /// The KEK its data key was said to be wrapped by (`provider:key_id:vN`).
    pub kek: String,
}

#[derive(Serialize, Deserialize)]
struct SavedCursor {
    target: String,
    cursor: Option<String>,
}

fn kek_text(k: &KekRef) -> String {
    format!("{}:{}:v{}", k.provider, k.key_id, k.version)
}

fn to_crypto_kek(k: &KekRef) -> strongroom_crypto::KekRef {
    strongroom_crypto::KekRef {
        provider: k.provider.clone(),
        key_id: k.key_id.clone(),
        version: k.version,
    }
}

fn to_store_kek(k: &strongroom_crypto::KekRef) -> KekRef {
    KekRef::new(k.provider.clone(), k.key_id.clone(), k.version)
}

enum Outcome {
    Rewrapped,
    Skipped,
    Failed(FailedVersion),
}

/// The version's envelope with only its data key: a rewrap leaves the value layer as it is,
/// so an empty stand-in replaces it (the store never hands the sealed value to a rewrap).
fn key_only(item: &RewrapItem) -> Sealed {
    Sealed {
        alg: Algorithm::Aes256Gcm,
        wrapped_key: WrappedKey {
            kek: to_crypto_kek(&item.kek),
            bytes: item.wrapped_key.clone(),
        },
        nonce: [0; 12],
        ciphertext: Vec::new(),
    }
}

/// Runs `op` on the version's data key ([`key_only`]) under the version's binding (see
/// `vault::open_bound`: it may be tried again, for a version sealed before expiries or hosts
/// were bound; a version moved so keeps the binding it was sealed with).
async fn on_data_key<T, F, Fut>(item: &RewrapItem, op: F) -> Result<T, EnvelopeError>
where
    F: Fn(strongroom_crypto::Binding, Sealed) -> Fut,
    Fut: std::future::Future<Output = Result<T, EnvelopeError>>,
{
    let sealed = key_only(item);
    crate::vault::open_bound(
        &item.owner,
        &item.name,
        item.version,
        &item.metadata,
        |binding| op(binding, sealed.clone()),
    )
    .await
    .map(|(value, _)| value)
}

/// A data key that did not unwrap: an error when the provider could not be asked (out of
/// reach, refused, misconfigured), which stops the run; `Ok` when it answered that the key
/// does not open under it (a KEK it does not hold, a tampered key).
fn outage(e: EnvelopeError) -> Result<(), CoreError> {
    match e {
        EnvelopeError::Provider(e)
            if matches!(
                e.kind(),
                ProviderErrorKind::Unavailable
                    | ProviderErrorKind::Denied
                    | ProviderErrorKind::Misconfigured
            ) =>
        {
            Err(CoreError::Unavailable(e.to_string()))
        }
        _ => Ok(()),
    }
}

/// A KEK that active versions use, and whether a provider opened a data key under it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KekSample {
    /// The KEK.
    pub kek: KekRef,
    /// The active versions under it.
    pub versions: u64,
    /// Whether the provider unwrapped the data key of one of the first few of them, in
    /// store order ([`SAMPLES_PER_KEK`]).
    pub opens: bool,
}

impl KekSample {
    /// `provider:key_id:vN`.
    pub fn kek_text(&self) -> String {
        kek_text(&self.kek)
    }
}

/// How many versions [`sample_keks`] tries under each KEK before it says the KEK does not
/// open: one damaged version does not make a whole KEK look lost.
pub const SAMPLES_PER_KEK: u32 = 3;

/// For every KEK the store's active versions use: whether `keys` unwraps the data key of one
/// of the first [`SAMPLES_PER_KEK`] versions under it (the data key only; no value is
/// decrypted). A KEK retired since, or one of another keyring or provider, does not, and no
/// version under it opens again: `strongroom restore` asks this of a backup before it
/// becomes the store. A few unwraps per KEK, not one per version: single damaged versions
/// are for `rewrap --dry-run` to find.
///
/// # Errors
///
/// [`CoreError::Unavailable`] when the store fails or the provider cannot be asked.
pub async fn sample_keks(
    store: &dyn Store,
    keys: &dyn KeyProvider,
) -> Result<Vec<KekSample>, CoreError> {
    let mut samples = Vec::new();
    for (kek, versions) in store.count_versions_by_kek().await? {
        let tried = store
            .versions_for_rewrap(&KekFilter::Exactly(kek.clone()), None, SAMPLES_PER_KEK)
            .await?
            .items;
        // None: destroyed since they were counted.
        if tried.is_empty() {
            continue;
        }
        let mut opens = false;
        for item in tried {
            let opened = on_data_key(&item, |binding, sealed| async move {
                envelope::check_binding(keys, &binding, &sealed).await
            })
            .await;
            match opened {
                Ok(()) => {
                    opens = true;
                    break;
                }
                Err(e) => outage(e)?,
            }
        }
        samples.push(KekSample {
            kek,
            versions,
            opens,
        });
    }
    Ok(samples)
}

/// Re-wraps one version's data key from `from` to `to`'s active KEK and stores it by
/// compare-and-swap. Provider outages and store failures are errors (the run stops);
/// a key that does not unwrap is `Failed`.
async fn rewrap_one(
    store: &dyn Store,
    from: &dyn KeyProvider,
    to: &dyn KeyProvider,
    item: RewrapItem,
    dry_run: bool,
) -> Result<Outcome, CoreError> {
    let failed = |item: &RewrapItem| {
        Outcome::Failed(FailedVersion {
            owner: item.owner.clone(),
            name: item.name.clone(),
            version: item.version,
            kek: kek_text(&item.kek),
        })
    };
    let rewrapped = on_data_key(&item, |binding, sealed| async move {
        envelope::rewrap(from, to, &binding, &sealed).await
    })
    .await;
    let new = match rewrapped {
        Ok(new) => new,
        Err(e) => return outage(e).map(|()| failed(&item)),
    };
    if dry_run {
        return Ok(Outcome::Rewrapped);
    }
    let swapped = store
        .replace_wrapped_key(
            &item.owner,
            &item.name,
            item.version,
            &item.kek,
            &item.wrapped_key,
            new.wrapped_key.bytes,
            &to_store_kek(&new.wrapped_key.kek),
        )
        .await?;
    Ok(if swapped {
        Outcome::Rewrapped
    } else {
        Outcome::Skipped
    })
}

/// Moves every active version's data key under `to`'s active KEK, unwrapping with `from`
/// (the same provider for a rotation, another one to move providers). `progress` is called
/// after every batch with the counts so far.
///
/// # Errors
///
/// [`CoreError::Unavailable`] when the store or a provider fails (the cursor of the last
/// finished batch is saved: run again to continue); [`CoreError::InvalidInput`] for a batch
/// size of 0.
pub async fn rewrap(
    store: Arc<dyn Store>,
    from: Arc<dyn KeyProvider>,
    to: Arc<dyn KeyProvider>,
    options: &RewrapOptions,
    progress: &mut (dyn FnMut(&RewrapReport) + Send),
) -> Result<RewrapReport, CoreError> {
    if options.batch_size == 0 {
        return Err(CoreError::InvalidInput("batch size must be at least 1"));
    }
    let target = to_store_kek(
        &to.active_kek()
            .map_err(|e| CoreError::Unavailable(e.to_string()))?,
    );
    let target_text = kek_text(&target);
    let mut report = RewrapReport {
        target: target_text.clone(),
        ..RewrapReport::default()
    };
    report.total = store
        .count_versions_by_kek()
        .await?
        .into_iter()
        .filter(|(k, _)| *k != target)
        .map(|(_, n)| n)
        .sum();

    let mut cursor = None;
    if let Some(bytes) = store.get_provider_state(CURSOR_KEY).await? {
        if let Ok(saved) = serde_json::from_slice::<SavedCursor>(&bytes) {
            if saved.target == target_text {
                cursor = saved.cursor.as_deref().and_then(|c| Cursor::parse(c).ok());
            }
        }
    }
    report.resumed = cursor.is_some();

    let mut batch = options.batch_size;
    if let Some(rate) = options.max_per_second {
        batch = batch.min(rate.max(1));
    }
    let concurrency = options.concurrency.max(1);
    let filter = KekFilter::Not(target);
    let started = Instant::now();
    loop {
        let page = store
            .versions_for_rewrap(&filter, cursor.as_ref(), batch)
            .await?;
        let count = page.items.len() as u64;
        let mut tasks: JoinSet<Result<Outcome, CoreError>> = JoinSet::new();
        let mut failure = None;
        for item in page.items {
            while tasks.len() >= concurrency {
                if let Some(done) = tasks.join_next().await {
                    tally(&mut report, done, &mut failure);
                }
            }
            let (store, from, to) = (store.clone(), from.clone(), to.clone());
            let dry_run = options.dry_run;
            tasks.spawn(async move {
                rewrap_one(store.as_ref(), from.as_ref(), to.as_ref(), item, dry_run).await
            });
        }
        while let Some(done) = tasks.join_next().await {
            tally(&mut report, done, &mut failure);
        }
        if let Some(e) = failure {
            return Err(e);
        }
        report.seen += count;
        cursor = page.next;
        if !options.dry_run {
            let saved = SavedCursor {
                target: target_text.clone(),
                cursor: cursor.as_ref().map(|c| c.as_str().to_owned()),
            };
            let bytes = serde_json::to_vec(&saved)
                .map_err(|e| CoreError::Internal(format!("rewrap cursor: {e}")))?;
            store.put_provider_state(CURSOR_KEY, bytes).await?;
        }
        progress(&report);
        if cursor.is_none() {
            break;
        }
        if let Some(rate) = options.max_per_second {
            let due = Duration::from_secs_f64(report.seen as f64 / f64::from(rate.max(1)));
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    Ok(report)
}

fn tally(
    report: &mut RewrapReport,
    done: Result<Result<Outcome, CoreError>, tokio::task::JoinError>,
    failure: &mut Option<CoreError>,
) {
    match done {
        Ok(Ok(Outcome::Rewrapped)) => report.rewrapped += 1,
        Ok(Ok(Outcome::Skipped)) => report.skipped += 1,
        Ok(Ok(Outcome::Failed(version))) => {
            report.failed += 1;
            if report.failures.len() < MAX_FAILURES_LISTED {
                report.failures.push(version);
            }
        }
        Ok(Err(e)) => {
            failure.get_or_insert(e);
        }
        Err(e) => {
            failure.get_or_insert(CoreError::Internal(format!("rewrap task: {e}")));
        }
    }
}

/// A provider that wraps with `to` and unwraps with whichever of `to` and `from` holds the
/// KEK: what a single-provider re-wrap (such as the audit head key's,
/// `strongroom_core::audit::rewrap_head_key`) needs while moving between providers.
#[derive(Debug)]
pub struct Moving {
    /// Where keys come from.
    pub from: Arc<dyn KeyProvider>,
    /// Where keys go.
    pub to: Arc<dyn KeyProvider>,
}

#[async_trait::async_trait]
impl KeyProvider for Moving {
    fn kind(&self) -> &str {
        self.to.kind()
    }

    fn active_kek(&self) -> Result<strongroom_crypto::KekRef, strongroom_crypto::ProviderError> {
        self.to.active_kek()
    }

    async fn wrap(
        &self,
        kek: &strongroom_crypto::KekRef,
        key: &strongroom_crypto::Key256,
        aad: &[u8],
    ) -> Result<WrappedKey, strongroom_crypto::ProviderError> {
        self.to.wrap(kek, key, aad).await
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        aad: &[u8],
    ) -> Result<strongroom_crypto::Key256, strongroom_crypto::UnwrapError> {
        match self.to.unwrap(wrapped, aad).await {
            Err(strongroom_crypto::UnwrapError::NotMine(_)) => self.from.unwrap(wrapped, aad).await,
            other => other,
        }
    }

    async fn health(&self) -> Result<(), strongroom_crypto::ProviderError> {
        self.from.health().await?;
        self.to.health().await
    }

    /// New keys are sealed by `to`: its rotations are the ones that matter.
    async fn reload_keks(&self) -> Result<bool, strongroom_crypto::ProviderError> {
        self.to.reload_keks().await
    }
}

/// How many active versions each KEK wraps, as `(kek, count)`.
///
/// # Errors
///
/// Store errors.
pub async fn versions_by_kek(store: &dyn Store) -> Result<Vec<(KekRef, u64)>, CoreError> {
    Ok(store.count_versions_by_kek().await?)
}

#[cfg(test)]
mod tests;

//! The handle of one registered instance.

use std::fmt;
use std::sync::Arc;

use futures::future::BoxFuture;
use keel_core::{InstanceStatus, ServiceInstance};

use crate::Error;

/// What a registry implementation does on behalf of a [`Registration`].
pub(crate) trait Backend: Send + Sync + fmt::Debug {
    fn set_status(&self, key: u64, status: InstanceStatus) -> BoxFuture<'_, Result<(), Error>>;
    fn deregister(&self, key: u64) -> BoxFuture<'_, Result<(), Error>>;
    /// Best effort, from `Drop`: must not block.
    fn deregister_detached(&self, key: u64);
}

/// A registered instance. [`deregister`](Self::deregister) removes it; dropping the handle
/// removes it too, in the background.
#[must_use = "dropping a Registration deregisters the instance"]
pub struct Registration {
    key: u64,
    path: String,
    instance: ServiceInstance,
    backend: Arc<dyn Backend>,
    active: bool,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("path", &self.path)
            .field("status", &self.instance.status)
            .finish()
    }
}

impl Registration {
    pub(crate) fn new(
        key: u64,
        path: String,
        instance: ServiceInstance,
        backend: Arc<dyn Backend>,
    ) -> Self {
        Self {
            key,
            path,
            instance,
            backend,
            active: true,
        }
    }

    /// The instance as registered (with its current status).
    pub fn instance(&self) -> &ServiceInstance {
        &self.instance
    }

    /// Where the instance lives (a ZooKeeper path; for Dubbo, the path at registration time).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Takes the instance in or out of rotation without deregistering it (readers only route to
    /// `UP` instances).
    ///
    /// # Errors
    /// The registry could not write the new status; the registration keeps its old one. With
    /// Dubbo the status is part of the node's name: [`Error::Duplicate`] when another
    /// registration of the same endpoint already has the new name.
    pub async fn set_status(&mut self, status: InstanceStatus) -> Result<(), Error> {
        self.backend.set_status(self.key, status).await?;
        self.instance.status = status;
        Ok(())
    }

    /// Removes the instance and waits until the registry confirms it.
    ///
    /// # Errors
    /// The node could not be deleted (it disappears anyway when the session ends).
    pub async fn deregister(mut self) -> Result<(), Error> {
        self.active = false;
        self.backend.deregister(self.key).await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.active {
            self.backend.deregister_detached(self.key);
        }
    }
}

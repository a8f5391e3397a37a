//! The request path's histograms: an observation is two relaxed atomic
//! adds (its bucket and the sum, both integers), where the prometheus
//! crate's takes four locked operations and a compare-and-swap loop for
//! its floating-point sum, and every request records four of them.
//!
//! Values are integers of a base unit (nanoseconds for seconds, bytes),
//! exported scaled to the family's unit. The count a scrape reports is its
//! buckets' total, so count and buckets always agree; the sum may lack an
//! observation made during the scrape, which the next scrape has.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto;

/// A family's buckets.
#[derive(Debug)]
struct Shape {
    /// Upper bounds in the exported unit, ascending.
    bounds: Vec<f64>,
    /// The same in base units.
    base_bounds: Vec<u64>,
    /// The exported unit in base units (1e-9 for seconds counted in
    /// nanoseconds).
    unit: f64,
}

/// One labelled histogram.
#[derive(Debug)]
pub(crate) struct Histogram {
    shape: Arc<Shape>,
    /// Observations per bucket (not cumulative), the last for those above
    /// every bound.
    counts: Box<[AtomicU64]>,
    /// Sum of the observations, in base units.
    sum: AtomicU64,
}

/// A histogram's numbers at one reading, in the exported unit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Snapshot<'a> {
    pub(crate) bounds: &'a [f64],
    /// Cumulative count at each bound.
    pub(crate) cumulative: Vec<u64>,
    pub(crate) count: u64,
    pub(crate) sum: f64,
}

impl Histogram {
    fn new(shape: Arc<Shape>) -> Self {
        let counts = (0..=shape.bounds.len())
            .map(|_| AtomicU64::new(0))
            .collect();
        Histogram {
            shape,
            counts,
            sum: AtomicU64::new(0),
        }
    }

    /// Records `value`, in base units.
    pub(crate) fn observe(&self, value: u64) {
        let index = self
            .shape
            .base_bounds
            .partition_point(|&bound| bound < value);
        if let Some(count) = self.counts.get(index) {
            count.fetch_add(1, Relaxed);
        }
        self.sum.fetch_add(value, Relaxed);
    }

    /// Records a duration, in nanoseconds.
    pub(crate) fn observe_duration(&self, duration: Duration) {
        self.observe(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
    }

    /// The numbers so far.
    pub(crate) fn snapshot(&self) -> Snapshot<'_> {
        let bounds = &self.shape.bounds[..];
        let mut total = 0;
        let mut cumulative = Vec::with_capacity(bounds.len());
        for (i, count) in self.counts.iter().enumerate() {
            total += count.load(Relaxed);
            if i < bounds.len() {
                cumulative.push(total);
            }
        }
        Snapshot {
            bounds,
            cumulative,
            count: total,
            sum: self.sum.load(Relaxed) as f64 * self.shape.unit,
        }
    }
}

/// A family of [`Histogram`]s by label values, exported through a
/// prometheus registry; clones share the family.
#[derive(Clone)]
pub(crate) struct HistogramVec(Arc<Family>);

struct Family {
    desc: Desc,
    shape: Arc<Shape>,
    children: Mutex<Vec<(Vec<String>, Arc<Histogram>)>>,
}

impl HistogramVec {
    /// A family named `name` with `bounds` in the exported unit, values
    /// counted in base units of `unit` each.
    pub(crate) fn new(
        name: &str,
        help: &str,
        bounds: &[f64],
        unit: f64,
        labels: &[&str],
    ) -> prometheus::Result<Self> {
        let desc = Desc::new(
            name.to_owned(),
            help.to_owned(),
            labels.iter().map(|label| (*label).to_owned()).collect(),
            HashMap::new(),
        )?;
        if !bounds.windows(2).all(|pair| pair[0] < pair[1]) {
            return Err(prometheus::Error::Msg(format!(
                "{name}: bucket bounds must ascend"
            )));
        }
        let base_bounds = bounds
            .iter()
            .map(|bound| (bound / unit).round() as u64)
            .collect();

        Ok(HistogramVec(Arc::new(Family {
            desc,
            shape: Arc::new(Shape {
                bounds: bounds.to_vec(),
                base_bounds,
                unit,
            }),
            children: Mutex::new(Vec::new()),
        })))
    }

    /// The histogram with these label values (in the order the labels were
    /// given), made at first ask.
    pub(crate) fn with_label_values(&self, values: &[&str]) -> Arc<Histogram> {
        let mut children = self
            .0
            .children
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((_, histogram)) = children.iter().find(|(known, _)| known == values) {
            return Arc::clone(histogram);
        }
        let histogram = Arc::new(Histogram::new(Arc::clone(&self.0.shape)));
        children.push((
            values.iter().map(|value| (*value).to_owned()).collect(),
            Arc::clone(&histogram),
        ));
        histogram
    }
}

impl Family {
    /// One child as the prometheus data model has it.
    fn metric(&self, values: &[String], histogram: &Histogram) -> proto::Metric {
        let mut labels: Vec<proto::LabelPair> = self
            .desc
            .variable_labels
            .iter()
            .zip(values)
            .map(|(name, value)| {
                let mut pair = proto::LabelPair::default();
                pair.set_name(name.clone());
                pair.set_value(value.clone());
                pair
            })
            .collect();
        labels.sort();
        let snapshot = histogram.snapshot();
        let mut data = proto::Histogram::default();
        data.set_sample_count(snapshot.count);
        data.set_sample_sum(snapshot.sum);
        data.set_bucket(
            snapshot
                .bounds
                .iter()
                .zip(&snapshot.cumulative)
                .map(|(bound, cumulative)| {
                    let mut bucket = proto::Bucket::default();
                    bucket.set_upper_bound(*bound);
                    bucket.set_cumulative_count(*cumulative);
                    bucket
                })
                .collect(),
        );
        let mut metric = proto::Metric::default();
        metric.set_label(labels);
        metric.set_histogram(data);
        metric
    }
}

impl Collector for HistogramVec {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.0.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let family = &self.0;
        let children = family
            .children
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut exported = proto::MetricFamily::default();
        exported.set_name(family.desc.fq_name.clone());
        exported.set_help(family.desc.help.clone());
        exported.set_field_type(proto::MetricType::HISTOGRAM);
        exported.set_metric(
            children
                .iter()
                .map(|(values, histogram)| family.metric(values, histogram))
                .collect(),
        );
        vec![exported]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn family() -> HistogramVec {
        HistogramVec::new("t_seconds", "help", &[0.005, 0.01, 1.0], 1e-9, &["b", "a"]).unwrap()
    }

    #[test]
    fn an_observation_on_a_bound_counts_in_that_bound() {
        let family = family();
        let histogram = family.with_label_values(&["x", "y"]);
        histogram.observe_duration(Duration::from_millis(5));
        histogram.observe_duration(Duration::from_nanos(5_000_001));
        histogram.observe_duration(Duration::from_secs(2));
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.bounds, &[0.005, 0.01, 1.0]);
        assert_eq!(snapshot.cumulative, vec![1, 2, 2]);
        assert_eq!(snapshot.count, 3);
        assert!((snapshot.sum - 2.010_000_001).abs() < 1e-12);
    }

    #[test]
    fn the_same_label_values_give_the_same_child() {
        let family = family();
        family.with_label_values(&["x", "y"]).observe(1);
        family.with_label_values(&["x", "y"]).observe(1);
        family.with_label_values(&["x", "z"]).observe(1);
        assert_eq!(family.with_label_values(&["x", "y"]).snapshot().count, 2);
        assert_eq!(family.with_label_values(&["x", "z"]).snapshot().count, 1);
    }

    #[test]
    fn bounds_that_do_not_ascend_are_refused() {
        assert!(HistogramVec::new("t", "help", &[1.0, 1.0], 1.0, &[]).is_err());
    }

    #[test]
    fn text_exposition_matches_the_prometheus_histogram() {
        // The same observations through the prometheus crate's histogram
        // and this one give the same lines, label order included.
        let ours = family();
        let theirs = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new("t_seconds", "help").buckets(vec![0.005, 0.01, 1.0]),
            &["b", "a"],
        )
        .unwrap();
        for millis in [1, 5, 7, 10, 500, 3000] {
            ours.with_label_values(&["x", "y"])
                .observe_duration(Duration::from_millis(millis));
            theirs
                .with_label_values(&["x", "y"])
                .observe(Duration::from_millis(millis).as_secs_f64());
        }
        let text = |collector: Box<dyn Collector>| {
            let registry = prometheus::Registry::new();
            registry.register(collector).unwrap();
            let mut out = Vec::new();
            prometheus::Encoder::encode(
                &prometheus::TextEncoder::new(),
                &registry.gather(),
                &mut out,
            )
            .unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(text(Box::new(ours)), text(Box::new(theirs)));
    }
}

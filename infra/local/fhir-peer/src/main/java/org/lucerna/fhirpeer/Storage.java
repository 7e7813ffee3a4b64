package org.lucerna.fhirpeer;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.rest.annotation.ConditionalUrlParam;
import ca.uhn.fhir.rest.annotation.Create;
import ca.uhn.fhir.rest.annotation.ResourceParam;
import ca.uhn.fhir.rest.annotation.Transaction;
import ca.uhn.fhir.rest.annotation.TransactionParam;
import ca.uhn.fhir.rest.annotation.Update;
import ca.uhn.fhir.rest.api.MethodOutcome;
import ca.uhn.fhir.rest.api.server.RequestDetails;
import ca.uhn.fhir.rest.server.exceptions.InvalidRequestException;
import ca.uhn.fhir.rest.server.exceptions.PreconditionFailedException;
import ca.uhn.fhir.rest.server.provider.HashMapResourceProvider;
import ca.uhn.fhir.util.ResourceReferenceInfo;
import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collection;
import java.util.Date;
import java.util.HashMap;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeMap;
import java.util.UUID;
import org.hl7.fhir.instance.model.api.IBaseReference;
import org.hl7.fhir.instance.model.api.IBaseResource;
import org.hl7.fhir.r4.model.Bundle;
import org.hl7.fhir.r4.model.Bundle.BundleEntryComponent;
import org.hl7.fhir.r4.model.Bundle.BundleEntryRequestComponent;
import org.hl7.fhir.r4.model.Bundle.HTTPVerb;
import org.hl7.fhir.r4.model.IdType;
import org.hl7.fhir.r4.model.Identifier;
import org.hl7.fhir.r4.model.Resource;

/**
 * The in-memory store: one versioned {@link HashMapResourceProvider} per resource type, the
 * transaction endpoint ({@code POST /fhir}), and the referential integrity a real FHIR server
 * enforces (a relative reference to a stored type must name a live resource).
 *
 * <p>Every write takes one lock, so a transaction is validated as a whole and then applied without
 * another write in between: it is all or nothing.
 */
final class Storage {
    private final FhirContext context;
    private final Object writeLock = new Object();
    private final Map<String, Provider<? extends IBaseResource>> providers = new LinkedHashMap<>();

    Storage(FhirContext context, Collection<Class<? extends IBaseResource>> types) {
        this.context = context;
        for (Class<? extends IBaseResource> type : types) {
            Provider<? extends IBaseResource> provider = new Provider<>(this, type);
            providers.put(context.getResourceType(type), provider);
        }
    }

    Collection<Provider<? extends IBaseResource>> providers() {
        return providers.values();
    }

    /** The plain provider HAPI binds to {@code POST [base]} with a Bundle. */
    Object transactionProvider() {
        return new TransactionProvider();
    }

    /** Forgets every resource and its history. */
    void clear() {
        synchronized (writeLock) {
            providers.values().forEach(HashMapResourceProvider::clear);
        }
    }

    private boolean isLive(String type, String id) {
        Provider<? extends IBaseResource> provider = providers.get(type);
        return provider != null && provider.isLive(id);
    }

    /**
     * Rejects a relative reference ({@code Type/id}) to a type this server stores when the target
     * is neither live nor written by the same request. Contained (#), absolute and urn: references
     * are not checked.
     */
    private void checkReferences(IBaseResource resource, Set<String> written, Set<String> deleted) {
        for (ResourceReferenceInfo info : context.newTerser().getAllResourceReferences(resource)) {
            String target = info.getResourceReference().getReferenceElement().getValue();
            if (target == null || target.startsWith("#") || target.contains(":")) {
                continue;
            }
            IdType id = new IdType(target);
            String type = id.getResourceType();
            if (type == null || !id.hasIdPart() || !providers.containsKey(type)) {
                continue;
            }
            String key = type + "/" + id.getIdPart();
            boolean resolves = written.contains(key) || (!deleted.contains(key) && isLive(type, id.getIdPart()));
            if (!resolves) {
                throw new InvalidRequestException(
                        "Resource " + key + " not found, specified in path: " + info.getName()
                                + " of " + context.getResourceType(resource));
            }
        }
    }

    /** A versioned in-memory store of one type whose writes check references under the store's lock. */
    static final class Provider<T extends IBaseResource> extends HashMapResourceProvider<T> {
        private final Storage storage;

        Provider(Storage storage, Class<T> type) {
            super(storage.context, type);
            this.storage = storage;
        }

        boolean isLive(String id) {
            synchronized (this) {
                TreeMap<Long, T> versions = myIdToVersionToResourceMap.get(id);
                return versions != null && !versions.isEmpty()
                        && !versions.lastEntry().getValue().isDeleted();
            }
        }

        /** Resources whose current version matches an {@code ifNoneExist} query. */
        List<T> matching(String query) {
            List<T> matches = new ArrayList<>();
            synchronized (this) {
                for (TreeMap<Long, T> versions : myIdToVersionToResourceMap.values()) {
                    T current = versions.isEmpty() ? null : versions.lastEntry().getValue();
                    if (current != null && !current.isDeleted() && storage.matches(current, query)) {
                        matches.add(current);
                    }
                }
            }
            return matches;
        }

        // Creates get a UUID rather than HashMapResourceProvider's counter, which collides with
        // numeric ids that clients PUT.
        @Create
        @Override
        public MethodOutcome create(@ResourceParam T resource, RequestDetails request) {
            synchronized (storage.writeLock) {
                resource.setId(new IdType(getFhirContext().getResourceType(getResourceType()), newId()));
                storage.checkReferences(resource, Set.of(), Set.of());
                return super.update(stamped(resource), null, request).setCreated(true);
            }
        }

        @Update
        @Override
        public MethodOutcome update(
                @ResourceParam T resource, @ConditionalUrlParam String conditional, RequestDetails request) {
            synchronized (storage.writeLock) {
                String key = getFhirContext().getResourceType(getResourceType()) + "/"
                        + resource.getIdElement().getIdPart();
                storage.checkReferences(resource, Set.of(key), Set.of());
                return super.update(stamped(resource), conditional, request);
            }
        }

        /** Stores a resource checked by a transaction (under the store's lock). */
        @SuppressWarnings("unchecked")
        private MethodOutcome put(IBaseResource resource) {
            return super.update(stamped((T) resource), null, null);
        }

        // HashMapResourceProvider writes meta.versionId only into a meta that exists, and never
        // meta.lastUpdated: set the latter, which also makes the former appear.
        private T stamped(T resource) {
            resource.getMeta().setLastUpdated(new Date());
            return resource;
        }
    }

    private static String newId() {
        return UUID.randomUUID().toString();
    }

    /** {@code ifNoneExist} of the simple kinds: {@code _id=x} or {@code identifier=[system|]value}. */
    private boolean matches(IBaseResource resource, String query) {
        int equals = query.indexOf('=');
        if (equals < 0 || query.contains("&")) {
            throw new InvalidRequestException(
                    "ifNoneExist '" + query + "' is not supported: use _id=x or identifier=[system|]value");
        }
        String name = query.substring(0, equals);
        String value = URLDecoder.decode(query.substring(equals + 1), StandardCharsets.UTF_8);
        if (name.equals("_id")) {
            return resource.getIdElement().getIdPart().equals(value);
        }
        if (!name.equals("identifier")) {
            throw new InvalidRequestException(
                    "ifNoneExist on '" + name + "' is not supported: use _id or identifier");
        }
        int bar = value.indexOf('|');
        String system = bar < 0 ? null : value.substring(0, bar);
        String code = bar < 0 ? value : value.substring(bar + 1);
        String path = context.getResourceType(resource) + ".identifier";
        for (Identifier identifier : context.newTerser().getValues(resource, path, Identifier.class)) {
            boolean systemMatches = system == null || system.equals(identifier.getSystem());
            if (systemMatches && code.equals(identifier.getValue())) {
                return true;
            }
        }
        return false;
    }

    /** One Bundle entry once checked: what to do, to which resource. */
    private record Planned(HTTPVerb method, String type, String id, Resource resource, boolean noop) {
        String key() {
            return type + "/" + id;
        }
    }

    /** The transaction endpoint: every entry is checked before any is applied. */
    public final class TransactionProvider {
        @Transaction
        public Bundle transaction(@TransactionParam Bundle bundle) {
            if (bundle.getType() != Bundle.BundleType.TRANSACTION) {
                String type = bundle.hasType() ? bundle.getType().toCode() : "";
                throw new InvalidRequestException("Bundle.type must be 'transaction', not '" + type + "'");
            }
            synchronized (writeLock) {
                List<Planned> plan = plan(bundle);
                return apply(plan);
            }
        }

        private List<Planned> plan(Bundle bundle) {
            List<Planned> plan = new ArrayList<>();
            Map<String, String> fullUrls = new HashMap<>();
            Set<String> keys = new HashSet<>();
            List<BundleEntryComponent> entries = bundle.getEntry();
            for (int index = 0; index < entries.size(); index++) {
                Planned planned = planEntry(entries.get(index), "Bundle.entry[" + index + "]");
                if (!keys.add(planned.key())) {
                    throw new InvalidRequestException("Bundle.entry[" + index + "]: " + planned.key()
                            + " appears more than once in the transaction");
                }
                String fullUrl = entries.get(index).getFullUrl();
                if (fullUrl != null && !fullUrl.isEmpty()) {
                    fullUrls.put(fullUrl, planned.key());
                }
                plan.add(planned);
            }
            Set<String> written = new HashSet<>();
            Set<String> deleted = new HashSet<>();
            for (Planned planned : plan) {
                (planned.method() == HTTPVerb.DELETE ? deleted : written).add(planned.key());
            }
            for (Planned planned : plan) {
                if (planned.resource() != null && !planned.noop()) {
                    rewriteReferences(planned.resource(), fullUrls);
                    checkReferences(planned.resource(), written, deleted);
                }
            }
            return plan;
        }

        private Planned planEntry(BundleEntryComponent entry, String where) {
            BundleEntryRequestComponent request = entry.getRequest();
            if (!entry.hasRequest() || !request.hasMethod() || !request.hasUrl()) {
                throw new InvalidRequestException(where + ": request.method and request.url are required");
            }
            String url = request.getUrl();
            if (url.contains("?")) {
                throw new InvalidRequestException(where + ": conditional URLs are not supported: " + url);
            }
            String[] parts = url.replaceAll("^/+", "").split("/");
            HTTPVerb method = request.getMethod();
            Resource resource = entry.getResource();
            String type = parts[0];
            Provider<? extends IBaseResource> provider = providers.get(type);
            if (provider == null) {
                throw new InvalidRequestException(where + ": this server does not store " + type);
            }
            switch (method) {
                case PUT -> {
                    requireResource(where, resource, type);
                    if (parts.length != 2) {
                        throw new InvalidRequestException(where + ": PUT needs the URL Type/id, not " + url);
                    }
                    String bodyId = resource.getIdElement().getIdPart();
                    if (bodyId != null && !bodyId.equals(parts[1])) {
                        throw new InvalidRequestException(
                                where + ": resource id " + bodyId + " does not match the URL " + url);
                    }
                    return new Planned(method, type, parts[1], resource.copy(), false);
                }
                case POST -> {
                    requireResource(where, resource, type);
                    if (parts.length != 1) {
                        throw new InvalidRequestException(where + ": POST needs the URL Type, not " + url);
                    }
                    String condition = request.getIfNoneExist();
                    if (condition != null && !condition.isEmpty()) {
                        String query = condition.replaceAll("^.*\\?", "");
                        List<? extends IBaseResource> found = provider.matching(query);
                        if (found.size() > 1) {
                            throw new PreconditionFailedException(where + ": ifNoneExist '" + condition
                                    + "' matches " + found.size() + " resources");
                        }
                        if (found.size() == 1) {
                            return new Planned(method, type, found.get(0).getIdElement().getIdPart(), null, true);
                        }
                    }
                    return new Planned(method, type, newId(), resource.copy(), false);
                }
                case DELETE -> {
                    if (parts.length != 2) {
                        throw new InvalidRequestException(where + ": DELETE needs the URL Type/id, not " + url);
                    }
                    return new Planned(method, type, parts[1], null, !provider.isLive(parts[1]));
                }
                default -> throw new InvalidRequestException(
                        where + ": method " + method.toCode() + " is not supported in a transaction");
            }
        }

        private void requireResource(String where, Resource resource, String type) {
            if (resource == null) {
                throw new InvalidRequestException(where + ": a resource is required");
            }
            if (!resource.fhirType().equals(type)) {
                throw new InvalidRequestException(
                        where + ": a " + resource.fhirType() + " cannot be written to " + type);
            }
        }

        private void rewriteReferences(IBaseResource resource, Map<String, String> fullUrls) {
            for (ResourceReferenceInfo info : context.newTerser().getAllResourceReferences(resource)) {
                IBaseReference reference = info.getResourceReference();
                String target = reference.getReferenceElement().getValue();
                if (target != null && fullUrls.containsKey(target)) {
                    reference.setReference(fullUrls.get(target));
                }
            }
        }

        private Bundle apply(List<Planned> plan) {
            Bundle response = new Bundle().setType(Bundle.BundleType.TRANSACTIONRESPONSE);
            for (Planned planned : plan) {
                Provider<? extends IBaseResource> provider = providers.get(planned.type());
                Bundle.BundleEntryResponseComponent answer = response.addEntry().getResponse();
                if (planned.method() == HTTPVerb.DELETE) {
                    if (!planned.noop()) {
                        provider.delete(new IdType(planned.type(), planned.id()), null);
                    }
                    answer.setStatus("204 No Content");
                    continue;
                }
                if (planned.noop()) {
                    IBaseResource current = provider.read(new IdType(planned.type(), planned.id()), null);
                    describe(answer, "200 OK", current);
                    continue;
                }
                planned.resource().setId(new IdType(planned.type(), planned.id()));
                boolean created = Boolean.TRUE.equals(provider.put(planned.resource()).getCreated());
                describe(answer, created ? "201 Created" : "200 OK", planned.resource());
            }
            return response;
        }

        private void describe(Bundle.BundleEntryResponseComponent answer, String status, IBaseResource stored) {
            IdType id = (IdType) stored.getIdElement();
            answer.setStatus(status)
                    .setLocation(id.toUnqualified().getValue())
                    .setEtag("W/\"" + id.getVersionIdPart() + "\"");
            if (stored.getMeta().getLastUpdated() != null) {
                answer.setLastModified(stored.getMeta().getLastUpdated());
            }
        }
    }
}
